"""Inception-v3, FID variant: the network of pytorch-fid / the TF FID code (`pt_inception-2015-12-05` weights).

This is the Inception-v3 that pytorch-fid builds with `use_fid_inception=True` (torchvision's Inception3 with
1008 classes, no aux head, and the patched Mixed blocks of the TensorFlow graph):

* Mixed_5b/5c/5d (A), 6b-6e (C), 7b (E_1): the 3x3 average pool of the pool branch does *not* count the zero
  padding (TensorFlow's average pool);
* Mixed_7c (E_2): the pool branch is a 3x3 *max* pool (stride 1, pad 1), as in the TF graph;
* every conv is conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU.

Outputs (`InceptionV3.__call__`): the 2048-d final average-pool features ("pool_3", what FID uses) and,
with `logits=True`, the 1008-way logits of the `fc` layer. Input: NHWC float32 already resized to 299x299 and
scaled to [-1, 1] (`diffusion_jax.eval.fid` does the resize / scaling with a selectable convention).

Weights: a safetensors file holding the PyTorch state dict (keys as in torchvision / pytorch-fid, e.g.
`Mixed_5b.branch1x1.conv.weight`); `scripts/convert_inception.py` makes it from the published .pth once.
`load_params(path)` maps it to the Flax tree (OIHW -> HWIO transposes) and checks every name both ways.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Pad = Union[int, Tuple[int, int]]
HIGHEST = jax.lax.Precision.HIGHEST
NUM_CLASSES = 1008
FEATURE_DIM = 2048
# pytorch-fid's InceptionV3 module wraps the same layers in `blocks.<i>.<j>`; the layer each index names.
PYTORCH_FID_BLOCKS = (("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
                      ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
                      ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
                      ("Mixed_7a", "Mixed_7b", "Mixed_7c"))


def _pair(v: Pad) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (inference: running mean / var, eps 1e-3) -> ReLU; torchvision's BasicConv2d."""
  features: int
  kernel: Pad = 1
  stride: int = 1
  padding: Pad = 0

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, precision=HIGHEST, name="conv")(x)
    scale = self.param("bn_scale", nn.initializers.ones, (self.features,))
    bias = self.param("bn_bias", nn.initializers.zeros, (self.features,))
    mean = self.param("bn_mean", nn.initializers.zeros, (self.features,))
    var = self.param("bn_var", nn.initializers.ones, (self.features,))
    x = (x - mean) * (scale * jax.lax.rsqrt(var + 1e-3)) + bias
    return nn.relu(x)


def _avg_pool_no_pad(x):
  """3x3 / stride 1 / pad 1 average that ignores the padding (TF; pytorch-fid's count_include_pad=False)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, 1, name="branch1x1")(x)
    b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_s2(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, 1, name="branch1x1")(x)
    b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_s2(x)], -1)


class InceptionE(nn.Module):
  """`pool="avg"`: FIDInceptionE_1 (Mixed_7b); `pool="max"`: FIDInceptionE_2 (Mixed_7c)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, 1, name="branch1x1")(x)
    b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.pool == "avg":
      p = _avg_pool_no_pad(x)
    else:
      p = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    bp = BasicConv2d(192, 1, name="branch_pool")(p)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
  """FID Inception-v3. `x`: [B, 299, 299, 3] float in [-1, 1] -> {"pool": [B, 2048]} (+ "logits": [B, 1008])."""

  @nn.compact
  def __call__(self, x, logits: bool = False) -> Dict[str, jnp.ndarray]:
    x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_s2(x)
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool = x.mean((1, 2))
    out = {"pool": pool}
    # Always create the fc params so one weights file / one tree serves both outputs.
    fc = nn.Dense(NUM_CLASSES, precision=HIGHEST, name="fc")
    if logits or self.is_initializing():
      out["logits"] = fc(pool)
    return out


# ------------------------------------------------------------------------------------------ weights

_BN = {"bn.weight": "bn_scale", "bn.bias": "bn_bias", "bn.running_mean": "bn_mean", "bn.running_var": "bn_var"}


def abstract_params():
  return jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))["params"]


def _from_pytorch_fid_module(sd: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """pytorch-fid's `InceptionV3().state_dict()` (`blocks.<i>.<j>.rest`) -> torchvision names (`Layer.rest`)."""
  out = {}
  for k, v in sd.items():
    if k.startswith("blocks."):
      _, i, j, rest = k.split(".", 3)
      k = f"{PYTORCH_FID_BLOCKS[int(i)][int(j)]}.{rest}"
    out[k] = v
  return out


def torch_to_flax(sd: Dict[str, np.ndarray], require_fc: bool = True) -> Dict:
  """PyTorch state dict (torchvision / pytorch-fid names) -> Flax params tree. Checks names and shapes."""
  from diffusion_jax.pretrained import io
  sd = _from_pytorch_fid_module({k: np.asarray(v) for k, v in sd.items() if not k.endswith("num_batches_tracked")})
  flat = {}
  for k, v in sd.items():
    parts = k.split(".")
    tail2 = ".".join(parts[-2:])
    if tail2 in _BN:
      flat["/".join(parts[:-2] + [_BN[tail2]])] = v
    elif tail2 == "conv.weight":
      flat["/".join(parts[:-1] + ["kernel"])] = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif k == "fc.weight":
      flat["fc/kernel"] = v.T
    elif k == "fc.bias":
      flat["fc/bias"] = v
    else:
      flat[k.replace(".", "/")] = v  # reported as unexpected below
  want = io.flatten(abstract_params())
  if not require_fc and "fc/kernel" not in flat:
    flat["fc/kernel"] = np.zeros(want["fc/kernel"].shape, np.float32)
    flat["fc/bias"] = np.zeros(want["fc/bias"].shape, np.float32)
  io.check_names(want.keys(), flat.keys(), "Inception-v3 (FID) weights")
  for k, v in flat.items():
    io.check_shape(k, v.shape, want[k].shape)
  return io.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def flax_to_torch(params) -> Dict[str, np.ndarray]:
  """Flax params -> PyTorch state dict with torchvision / pytorch-fid names (the inverse of `torch_to_flax`;
  BN `num_batches_tracked` is not written)."""
  from diffusion_jax.pretrained import io
  inv = {v: k for k, v in _BN.items()}
  out = {}
  for k, v in io.flatten(params).items():
    v = np.asarray(v, np.float32)
    parts = k.split("/")
    if parts[-1] in inv:
      out[".".join(parts[:-1]) + "." + inv[parts[-1]]] = v
    elif k == "fc/kernel":
      out["fc.weight"] = v.T
    elif k == "fc/bias":
      out["fc.bias"] = v
    else:  # <layer>/conv/kernel
      out[".".join(parts[:-1]) + ".weight"] = v.transpose(3, 2, 0, 1)
  return out


def load_params(path: str, *, allow_pickle: bool = False) -> Dict:
  """Flax params from a safetensors file of the PyTorch state dict (see `scripts/convert_inception.py`)."""
  import os
  from diffusion_jax.pretrained import io
  if not path:
    raise FileNotFoundError(
        "FID needs the Inception-v3 weights (config.eval.inception_path): download pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth and convert it once with `python scripts/convert_inception.py "
        "--allow_pickle pt_inception-2015-12-05-6726825d.pth inception_fid.safetensors` (see docs/eval.md).")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception-v3 weights not found: {path}. Make them with scripts/convert_inception.py "
                            "(see docs/eval.md).")
  return torch_to_flax(io.load_state_dict(path, allow_pickle=allow_pickle))
