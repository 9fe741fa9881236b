"""LPIPS parity with the `lpips` package (real package code: LPIPS, its shipped v0.1 linear heads; torchvision's
AlexNet / VGG16 `features` layers re-stated in tests/eval/restated_torchvision) on random trunk weights, through
scripts/convert_lpips.py (trunk as a torchvision-named .pth + the package's head file)."""

import importlib.util
import os

import numpy as np
import pytest

from reference_packages import import_reference

torch = pytest.importorskip("torch")

from diffusion_jax.eval import lpips as L  # noqa: E402


def _script():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "convert_lpips.py")
  spec = importlib.util.spec_from_file_location("_convert_lpips", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_parity(net, tmp_path):
  lp = import_reference("lpips")
  torch.manual_seed(0)
  ref = lp.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False).eval()  # shipped heads, random trunk
  heads = os.path.join(os.path.dirname(lp.__file__), "weights", "v0.1", f"{net}.pth")
  shipped = torch.load(heads, map_location="cpu", weights_only=True)
  assert float(shipped["lin0.model.1.weight"].abs().sum()) > 0
  torch.testing.assert_close(ref.lin0.model[1].weight, shipped["lin0.model.1.weight"])  # heads loaded
  # the trunk as torchvision names it (features.<i>.*), saved like torchvision's .pth
  trunk = {}
  for k, v in ref.net.state_dict().items():
    _, i, leaf = k.split(".")  # slice<k>.<i>.<leaf>
    trunk[f"features.{i}.{leaf}"] = v.clone()
  tp = str(tmp_path / "trunk.pth")
  torch.save(trunk, tp)
  out = str(tmp_path / "lpips.safetensors")
  _script().main([out, "--net", net, "--heads", heads, "--trunk", tp, "--allow_pickle"])
  params = L.load_params(out, net)

  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
  got = L.lpips_distance(params, x0, x1, net)
  with torch.no_grad():
    want = ref(torch.from_numpy(x0.transpose(0, 3, 1, 2)), torch.from_numpy(x1.transpose(0, 3, 1, 2))).numpy()
  want = want.reshape(-1)
  err = np.abs(got - want).max()
  print(f"\nLPIPS_PARITY {net} values={want} max_abs_diff={err:.3g}")
  assert np.all(want > 1e-4)
  assert err <= 1e-5 * max(1.0, np.abs(want).max())
  np.testing.assert_allclose(L.lpips_distance(params, x0, x0, net), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    L.lpips_distance(params, x0 * 255, x1, net)


def test_lpips_convert_refuses_pickle(tmp_path):
  lp = import_reference("lpips")
  heads = os.path.join(os.path.dirname(lp.__file__), "weights", "v0.1", "alex.pth")
  from diffusion_jax.pretrained.io import CheckpointError
  with pytest.raises(CheckpointError, match="pickle"):
    _script().main([str(tmp_path / "x.safetensors"), "--heads", heads, "--trunk", heads])
