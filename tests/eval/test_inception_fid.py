"""FID Inception-v3 parity with pytorch-fid's `InceptionV3` (real package code; torchvision's Inception3 layers
re-stated in tests/eval/restated_torchvision) on the same random weights, through the conversion script."""

import os
import sys

import numpy as np
import pytest

from reference_packages import import_reference

torch = pytest.importorskip("torch")

def _load_script(name):
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


convert_inception = _load_script("convert_inception")

from diffusion_jax.eval import fid, inception  # noqa: E402
from diffusion_jax.pretrained.io import CheckpointError  # noqa: E402


def _randomize(module: "torch.nn.Module", seed: int):
  """Random weights that keep activations O(1) through the ~95 conv layers; random BN statistics too."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if not t.is_floating_point():
        continue
      if name.endswith("conv.weight"):
        fan_in = t[0].numel()
        t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif name.endswith("bn.weight") or name.endswith("running_var"):
        t.copy_(0.5 + torch.rand(t.shape, generator=g))
      elif name.endswith("bn.bias") or name.endswith("running_mean"):
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
      elif name == "fc.weight":
        t.copy_(torch.randn(t.shape, generator=g) / t.shape[1] ** 0.5)
      elif name == "fc.bias":
        t.copy_(0.1 * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's InceptionV3 (use_fid_inception=True), its weights download replaced by random weights of
  the right names: the published file's layout (torchvision names), saved as .pth like the real file."""
  pf = import_reference("pytorch_fid.inception")
  captured = {}
  orig = pf._inception_v3

  def capture(*a, **k):
    captured["net"] = orig(*a, **k)
    return captured["net"]

  def fake_download(url, progress=True):
    assert "pt_inception-2015-12-05" in url
    _randomize(captured["net"], seed=0)
    return {k: v.clone() for k, v in captured["net"].state_dict().items()}

  pf._inception_v3, pf.load_state_dict_from_url = capture, fake_download
  try:
    model = pf.InceptionV3([3], resize_input=True, normalize_input=True).eval()
  finally:
    pf._inception_v3 = orig
  d = tmp_path_factory.mktemp("inception")
  pth = str(d / "pt_inception-2015-12-05-random.pth")
  torch.save(captured["net"].state_dict(), pth)
  st = str(d / "inception.safetensors")
  convert_inception.main(["--allow_pickle", pth, st])
  return {"pf": pf, "model": model, "fc": captured["net"].fc, "pth": pth, "st": st, "dir": d}


def test_convert_refuses_pickle_without_flag(reference):
  with pytest.raises(CheckpointError, match="pickle"):
    convert_inception.main([reference["pth"], str(reference["dir"] / "x.safetensors")])


def test_parity_with_pytorch_fid(reference):
  """Features of random uint8 64x64 images (resized inside both networks, pytorch-fid's bilinear).

  Tolerance: both are fp32 against a float64 run of the same torch module; JAX's error must be of the same
  order as torch's own fp32 error (<= 4x + 1e-6 * scale), and the max abs diff JAX - torch(fp32) < 1e-4 * scale."""
  ext = fid.InceptionFeatures.from_file(reference["st"], resize="pytorch_fid", batch_size=4, logits=True)
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
  out = next(iter(ext.batches(imgs)))
  x = torch.from_numpy(imgs.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
  model = reference["model"]
  with torch.no_grad():
    ref32 = model(x)[0][:, :, 0, 0].numpy()
    ref64 = model.double()(x.double())[0][:, :, 0, 0].numpy()
    model.float()
    logits_ref = reference["fc"].double()(torch.from_numpy(ref64)).numpy()
    reference["fc"].float()
  scale = np.abs(ref64).max()
  assert scale > 1e-2 and np.std(ref64) > 1e-3  # non-degenerate features
  err_jax, err_torch = np.abs(out["pool"] - ref64).max(), np.abs(ref32 - ref64).max()
  diff = np.abs(out["pool"] - ref32).max()
  print(f"\nINCEPTION_PARITY scale={scale:.4g} |jax-torch32|={diff:.3g} |jax-f64|={err_jax:.3g} "
        f"|torch32-f64|={err_torch:.3g}")
  assert err_jax <= 4 * err_torch + 1e-6 * scale
  assert diff < 1e-4 * scale
  lscale = np.abs(logits_ref).max()
  assert np.abs(out["logits"] - logits_ref).max() < 1e-4 * lscale


def test_pytorch_fid_module_names_load(reference):
  """pytorch-fid's own module state dict (`blocks.i.j.*`, no fc) maps to the same Flax params as the file."""
  import jax
  sd = {k: v.numpy() for k, v in reference["model"].state_dict().items()}
  assert any(k.startswith("blocks.3.2.") for k in sd)
  pa = inception.torch_to_flax(sd, require_fc=False)
  pb = inception.load_params(reference["st"])
  pa.pop("fc"), pb.pop("fc")
  la, lb = jax.tree.leaves_with_path(pa), jax.tree.leaves_with_path(pb)
  assert [p for p, _ in la] == [p for p, _ in lb] and len(la) == 94 * 5
  for (_, a), (_, b) in zip(la, lb):
    np.testing.assert_array_equal(a, b)


def test_wrong_weights_file_is_named(reference, tmp_path):
  from diffusion_jax.pretrained.io import save_state_dict
  sd = {k: v.numpy() for k, v in reference["model"].state_dict().items() if "Mixed_7c" not in k and "blocks.3.2" not in k}
  p = str(tmp_path / "bad.safetensors")
  save_state_dict(sd, p)
  with pytest.raises(CheckpointError, match="Mixed_7c"):
    inception.load_params(p)
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    inception.load_params(str(tmp_path / "missing.safetensors"))
