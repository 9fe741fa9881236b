"""LPIPS (Zhang et al. 2018), v0.1, AlexNet or VGG16 trunk: a Flax port of the `lpips` package's `LPIPS`.

d(x0, x1) = sum_l mean_hw( w_l . (n(f_l(x0)) - n(f_l(x1)))^2 ), where f_l are the trunk's ReLU outputs
(alex: relu1..relu5 of torchvision's AlexNet `features`; vgg: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3),
n(.) the unit-normalisation over channels (eps 1e-10 added to the norm), w_l >= 0 the learned 1x1 "linear
heads" (shipped in the lpips package as weights/v0.1/<net>.pth), and the input scaling layer
(x - shift) / scale with shift (-.030, -.088, -.188), scale (.458, .448, .450). Inputs: NHWC in [-1, 1].

Weights: one safetensors file holding the `lpips.LPIPS` state dict (`net.slice<k>.<i>.weight|bias` for the
trunk, `lin<l>.model.1.weight` for the heads); `scripts/convert_lpips.py` builds it from the package's head
file and the torchvision trunk weights (.pth; pickle only behind --allow_pickle).
"""

from __future__ import annotations

from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Per trunk: torchvision `features` layers as (index, kind, out_channels, kernel, stride, pad); the slice
# boundaries of lpips.pretrained_networks (an output after each slice), and the channels per output.
NETS = {
    "alex": dict(layers=((0, "conv", 64, 11, 4, 2), (2, "pool3"), (3, "conv", 192, 5, 1, 2), (5, "pool3"),
                         (6, "conv", 384, 3, 1, 1), (8, "conv", 256, 3, 1, 1), (10, "conv", 256, 3, 1, 1)),
                 slices=(2, 5, 8, 10, 12), chns=(64, 192, 384, 256, 256)),
    "vgg": dict(layers=((0, "conv", 64), (2, "conv", 64), (4, "pool2"), (5, "conv", 128), (7, "conv", 128),
                        (9, "pool2"), (10, "conv", 256), (12, "conv", 256), (14, "conv", 256), (16, "pool2"),
                        (17, "conv", 512), (19, "conv", 512), (21, "conv", 512), (23, "pool2"),
                        (24, "conv", 512), (26, "conv", 512), (28, "conv", 512)),
                slices=(4, 9, 16, 23, 30), chns=(64, 128, 256, 512, 512)),
}
HIGHEST = jax.lax.Precision.HIGHEST


def _slice_of(net: str, index: int) -> int:
  return next(k for k, end in enumerate(NETS[net]["slices"]) if index < end) + 1


class LPIPS(nn.Module):
  """`__call__(x0, x1)` -> [B] distances (x in [-1, 1], NHWC). Param names: `net_slice<k>_<i>` (trunk conv at
  torchvision index i, in lpips slice k) and `lin<l>` (head l)."""
  net: str = "alex"

  @nn.compact
  def __call__(self, x0, x1):
    spec = NETS[self.net]
    shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
    x = (jnp.concatenate([x0, x1]) - shift) / scale
    convs = {}
    outs = []
    ends = set(spec["slices"])
    for layer in spec["layers"]:
      i, kind = layer[0], layer[1]
      if kind == "conv":
        cout = layer[2]
        k, s, p = layer[3:] if len(layer) > 3 else (3, 1, 1)
        name = f"net_slice{_slice_of(self.net, i)}_{i}"
        convs[i] = nn.Conv(cout, (k, k), strides=s, padding=((p, p), (p, p)), precision=HIGHEST, name=name)
        x = nn.relu(convs[i](x))
        if i + 2 in ends:  # the ReLU at i + 1 ends a slice
          outs.append(x)
      elif kind == "pool3":
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
      else:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    total = 0.0
    b = x0.shape[0]
    for l, f in enumerate(outs):
      f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
      d = jnp.square(f[:b] - f[b:])
      lin = nn.Conv(1, (1, 1), use_bias=False, precision=HIGHEST, name=f"lin{l}")
      total = total + lin(d).mean((1, 2, 3))
    return total


def abstract_params(net: str):
  z = jnp.zeros((1, 64, 64, 3))
  return jax.eval_shape(lambda: LPIPS(net).init(jax.random.key(0), z, z))["params"]


def torch_to_flax(sd: Dict[str, np.ndarray], net: str) -> Dict:
  """`lpips.LPIPS(net=...)` state dict -> Flax params; names and shapes checked both ways."""
  from diffusion_jax.pretrained import io
  flat = {}
  for k, v in sd.items():
    v = np.asarray(v, np.float32)
    parts = k.split(".")
    if parts[0] == "net" and len(parts) == 4:  # net.slice<k>.<i>.weight|bias
      base = f"net_{parts[1]}_{parts[2]}"
      flat[f"{base}/kernel" if parts[3] == "weight" else f"{base}/bias"] = (
          v.transpose(2, 3, 1, 0) if parts[3] == "weight" else v)
    elif parts[0].startswith("lin") and parts[-1] == "weight":  # lin<l>.model.1.weight
      flat[f"{parts[0]}/kernel"] = v.transpose(2, 3, 1, 0)
    elif k.startswith("scaling_layer."):
      continue  # constant buffers (shift / scale), fixed in this module
    else:
      flat[k.replace(".", "/")] = v
  want = io.flatten(abstract_params(net))
  io.check_names(want.keys(), flat.keys(), f"LPIPS ({net}) weights")
  for k, v in flat.items():
    io.check_shape(k, v.shape, want[k].shape)
  return io.unflatten(flat)


def torchvision_features_to_lpips(features: Dict[str, np.ndarray], net: str) -> Dict[str, np.ndarray]:
  """torchvision `features.<i>.weight|bias` (an AlexNet / VGG16 state dict) -> lpips `net.slice<k>.<i>.*`."""
  out = {}
  for k, v in features.items():
    parts = k.split(".")
    if parts[0] != "features":
      continue  # the classifier is not part of LPIPS
    i = int(parts[1])
    out[f"net.slice{_slice_of(net, i)}.{i}.{parts[2]}"] = v
  return out


def load_params(path: str, net: str = "alex", *, allow_pickle: bool = False) -> Dict:
  import os
  from diffusion_jax.pretrained import io
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"LPIPS weights not found: {path!r}. Build them once with scripts/convert_lpips.py "
                            "from the lpips package's head file and the torchvision trunk weights (docs/eval.md).")
  return torch_to_flax(io.load_state_dict(path, allow_pickle=allow_pickle), net)


def lpips_distance(params, x0, x1, net: str = "alex") -> np.ndarray:
  """[B] LPIPS distances of NHWC images in [-1, 1] (at least 32x32 for the AlexNet trunk)."""
  x0, x1 = jnp.asarray(x0, jnp.float32), jnp.asarray(x1, jnp.float32)
  if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
    raise ValueError(f"LPIPS needs two NHWC RGB batches of one shape, got {x0.shape} and {x1.shape}.")
  if float(jnp.min(jnp.minimum(x0, x1))) < -1.001 or float(jnp.max(jnp.maximum(x0, x1))) > 1.001:
    raise ValueError("LPIPS expects images in [-1, 1] (x / 127.5 - 1 for uint8).")
  return np.asarray(_apply(net, params, x0, x1))


_CACHE = {}


def _apply(net, params, x0, x1):
  if net not in _CACHE:  # one jitted function per trunk
    _CACHE[net] = jax.jit(lambda p, a, b: LPIPS(net).apply({"params": p}, a, b))
  return _CACHE[net](params, x0, x1)
