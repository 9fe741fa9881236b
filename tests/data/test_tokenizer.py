"""CLIP tokenizer: ids equal the original CLIP tokenizer's (open_clip's `SimpleTokenizer`, when installed) and
published ids; the packaged vocabulary round-trips through a transformers tokenizer directory."""

import importlib.util

import numpy as np
import pytest

from diffusion_jax.data import tokenizer as tk

STRINGS = [
    "a photo of a cat",
    "A Large RED circle, left of a small blue square!",
    "Tom &amp; Jerry &lt;3 &quot;hi&quot;",
    "numbers 12345 and 3.14, 1/2",
    "don't stop... it's   fine\n\tok?!",
    "café naïve résumé",
    "emoji \U0001F600 ok",
    "word " * 100,  # longer than the context: truncated, EOS kept last
    "",
]


@pytest.fixture(scope="module")
def tok():
  return tk.CLIPTokenizer()


def _open_clip_reference():
  """open_clip's tokenizer module, loaded from its file (the package __init__ needs torchvision)."""
  try:
    import importlib.metadata as md
    path = md.distribution("open_clip_torch").locate_file("open_clip/tokenizer.py")
  except Exception:  # not installed
    return None
  spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", str(path))
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except ImportError:
    return None
  return mod.SimpleTokenizer()


def test_published_ids(tok):
  # transformers' CLIP documentation example: "a photo of a cat" / "a photo of a dog".
  out = tok(["a photo of a cat", "a photo of a dog"])
  np.testing.assert_array_equal(out["input_ids"][:, :7], [[49406, 320, 1125, 539, 320, 2368, 49407],
                                                          [49406, 320, 1125, 539, 320, 1929, 49407]])
  assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.vocab_size == 49408
  assert (out["input_ids"][:, 7:] == 49407).all() and out["input_ids"].shape == (2, 77)
  np.testing.assert_array_equal(out["attention_mask"].sum(1), [7, 7])


def test_html_entities_case_and_whitespace(tok):
  assert tok.encode("Tom &amp; Jerry") == tok.encode("tom & jerry")
  assert tok.encode("&amp;amp;") == tok.encode("&")  # unescaped twice, as CLIP does
  assert tok.encode("a  red\n circle") == tok.encode("a red circle")
  assert tok.encode("RED") == tok.encode("red") == [736]


def test_matches_open_clip(tok):
  ref = _open_clip_reference()
  if ref is None:
    pytest.skip("open_clip_torch not installed (pip install --no-deps open_clip_torch ftfy)")
  ours = tok(STRINGS, max_length=77)["input_ids"]
  theirs = ref(STRINGS, context_length=77).numpy()  # pads with 0
  for s, a, b in zip(STRINGS, ours, theirs):
    n = int((b != 0).sum())
    np.testing.assert_array_equal(a[:n], b[:n], err_msg=repr(s))
    assert (a[n:] == 49407).all()


def test_truncation_and_padding(tok):
  out = tok("word " * 100, max_length=16)
  assert out["input_ids"].shape == (1, 16) and out["input_ids"][0, -1] == 49407 and out["input_ids"][0, 0] == 49406
  assert out["attention_mask"].all()
  zero_pad = tk.CLIPTokenizer(pad_token_id=0)
  ids = zero_pad("a cat")["input_ids"][0]
  np.testing.assert_array_equal(ids[:4], [49406, 320, 2368, 49407])
  assert (ids[4:] == 0).all()
  assert tok.decode(tok("a red circle")["input_ids"][0]).startswith("a red circle")


def test_tokenizer_directory_round_trip(tmp_path, tok):
  d = tk.write_tokenizer_files(str(tmp_path / "tok"))
  from_dir = tk.CLIPTokenizer(d)
  np.testing.assert_array_equal(from_dir(STRINGS)["input_ids"], tok(STRINGS)["input_ids"])
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tk.CLIPTokenizer(str(tmp_path / "missing"))
