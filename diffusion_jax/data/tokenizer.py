"""CLIP tokenizer: byte-level BPE with the original CLIP vocabulary (49408 tokens), through transformers'
`CLIPTokenizer`, working offline.

The vocabulary ships with the package (`diffusion_jax/assets/bpe_simple_vocab_16e6.txt.gz`, OpenAI CLIP, MIT
licence in `assets/CLIP_LICENSE`). vocab.json / merges are rebuilt from it the way the CLIP release does: the 256
byte symbols of `bytes_to_unicode`, the same symbols with the end-of-word marker `</w>`, one token per merge
(merges 1 .. 49152-256-2 of the file), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407).

Text is cleaned as the CLIP release does before BPE (`ftfy.fix_text`, HTML entities unescaped twice, whitespace
collapsed, lower case), so that ids equal the original tokenizer's, e.g. "&amp;" -> "&".
transformers >= 5's `CLIPTokenizer` skips that cleaning, so it is done here.

  tok = CLIPTokenizer()                                  # packaged vocab
  tok = CLIPTokenizer("path/to/tokenizer_dir")           # any transformers CLIP tokenizer directory
  batch = tok(["a red circle", "a blue square"])         # {"input_ids": (2, 77) int32, "attention_mask": ...}
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
BPE_PATH = os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
CONTEXT_LENGTH = 77


@functools.lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
  """Reversible byte -> printable unicode map of byte-level BPE (GPT-2 / CLIP)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=2)
def clip_vocab_and_merges(bpe_path: str = BPE_PATH) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
  """(vocab token -> id, merges) built from the CLIP BPE merges file."""
  if not os.path.exists(bpe_path):
    raise FileNotFoundError(f"CLIP BPE vocabulary not found at {bpe_path}; reinstall the package (it ships as "
                            "package data) or pass a transformers tokenizer directory.")
  with gzip.open(bpe_path) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
  symbols = list(bytes_to_unicode().values())
  tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
  return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(directory: str, bpe_path: str = BPE_PATH) -> str:
  """Writes vocab.json + merges.txt (+ the special-token config), a directory that
  `transformers.CLIPTokenizer.from_pretrained` reads. Returns `directory`."""
  vocab, merges = clip_vocab_and_merges(bpe_path)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
               "pad_token": EOS, "model_max_length": CONTEXT_LENGTH}, f)
  return directory


def clean_text(text: str) -> str:
  """CLIP's `basic_clean` + `whitespace_clean`: ftfy fix, HTML unescape (twice), collapse whitespace."""
  try:
    import ftfy
    text = ftfy.fix_text(text)
  except ImportError:  # ftfy only repairs mojibake; ordinary text is unaffected
    pass
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip()


class CLIPTokenizer:
  """Batch tokenizer returning numpy arrays ready for `models.clip.CLIPTextModel`.

  Args:
    path: a transformers tokenizer directory (vocab.json + merges.txt); None = the packaged CLIP vocabulary.
    max_length: context length (77 for every public CLIP).
    pad_token_id: id written after the end-of-text token. 49407 (<|endoftext|>) is what the OpenAI / SD-1 / Karlo
      tokenizers use; 0 ("!") is what OpenCLIP and SD-2 use.
  """

  def __init__(self, path: Optional[str] = None, max_length: int = CONTEXT_LENGTH, pad_token_id: int = EOS_ID):
    import transformers
    if path is None:
      vocab, merges = clip_vocab_and_merges()
      # transformers >= 5 ignores vocab_file=/merges_file= in this constructor; vocab=/merges= are honoured.
      self._tok = transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    else:
      if not os.path.isdir(path):
        raise FileNotFoundError(f"Tokenizer directory not found: {path} (expected vocab.json and merges.txt).")
      self._tok = transformers.CLIPTokenizer.from_pretrained(path)
    self.max_length = max_length
    self.pad_token_id = pad_token_id
    self.bos_token_id = self._tok.convert_tokens_to_ids(BOS)
    self.eos_token_id = self._tok.convert_tokens_to_ids(EOS)
    self.vocab_size = len(self._tok)

  def encode(self, text: str) -> List[int]:
    """BPE ids of `text` without start/end tokens and without truncation."""
    return list(self._tok(clean_text(text).lower(), add_special_tokens=False)["input_ids"])

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if int(i) not in (self.bos_token_id, self.eos_token_id)]
    return self._tok.decode(ids).strip()

  def __call__(self, texts: Union[str, Sequence[str]], max_length: Optional[int] = None) -> Dict[str, np.ndarray]:
    """[BOS] + ids + [EOS], truncated to `max_length` (EOS kept last), padded with `pad_token_id`.

    Returns input_ids (B, L) int32 and attention_mask (B, L) int32 (1 up to and including EOS).
    """
    if isinstance(texts, str):
      texts = [texts]
    length = max_length or self.max_length
    ids = np.full((len(texts), length), self.pad_token_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
      toks = [self.bos_token_id] + self.encode(text)[:length - 2] + [self.eos_token_id]
      ids[i, :len(toks)] = toks
      mask[i, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask}
