"""Parameter counts of the DiffiT / DiT networks, from shapes only (`jax.eval_shape`: no weights are made).

    python benchmarks/param_counts.py

Counts are trainable parameters. The fixed 2-D sin-cos position table of the latent models is not a parameter
here; the DiT paper's 675M counts it (PyTorch keeps it as a frozen nn.Parameter), so the "with pos-embed"
column adds it. The last column is the analytic forward FLOPs per image (2 per multiply-add; the DiT/DiffiT
papers' "GFLOPs" count multiply-adds, i.e. half of this).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax.models import build_model  # noqa: E402
from diffusion_jax.models.dit import dit_kwargs  # noqa: E402

import importlib.util as _ilu  # noqa: E402

_spec = _ilu.spec_from_file_location("benchmarks_train_step",
                                     os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py"))
_mod = _ilu.module_from_spec(_spec)
sys.modules["benchmarks_train_step"] = _mod
_spec.loader.exec_module(_mod)


def count_params(model_cfg: Dict, input_shape: Tuple[int, ...]) -> int:
  """Number of trainable parameters of `build_model(model_cfg)` for inputs `[1, *input_shape]`."""
  model = build_model(model_cfg)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(lambda x, t, y: model.init(jax.random.key(0), x, t, y), x, t, y)
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))


def forward_gflops(model_cfg: Dict, input_shape: Tuple[int, ...]) -> float:
  """Analytic matmul + conv FLOPs (2 per MAC) of one forward pass for one image (see train_step.py)."""
  from benchmarks_train_step import jaxpr_flops
  model = build_model(model_cfg)
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  p = jax.eval_shape(lambda x, t, y: model.init(jax.random.key(0), x, t, y), x, t, y)
  return jaxpr_flops(jax.make_jaxpr(model.apply)(p, x, t, y).jaxpr) / 1e9


def pos_embed_size(model_cfg: Dict) -> int:
  if model_cfg["name"] not in ("diffit_latent", "dit"):
    return 0
  g = model_cfg["input_size"] // model_cfg.get("patch_size", 2)
  return g * g * model_cfg.get("hidden_size", 1152)


def table():
  rows = [
      ("DiffiT-XL/2 IN-256 (latent 32x32x4)", dict(name="diffit_latent", input_size=32), (32, 32, 4), 561.0),
      ("DiffiT-XL/2 IN-512 (latent 64x64x4)", dict(name="diffit_latent", input_size=64), (64, 64, 4), None),
      ("DiffiT latent, depth 30 (paper H.2 text)", dict(name="diffit_latent", input_size=32, depth=30), (32, 32, 4),
       None),
      ("DiT-XL/2 IN-256", dict(name="dit", input_size=32, **dit_kwargs("XL/2")), (32, 32, 4), 675.0),
  ]
  for spec in ("S/2", "B/2", "L/2", "XL/4", "XL/8"):
    rows.append((f"DiT-{spec} IN-256", dict(name="dit", input_size=32, **dit_kwargs(spec)), (32, 32, 4), None))
  rows += [
      ("DiffiT image CIFAR-10 (I.1: 2/2/2, 128/256/256)", dict(name="diffit_image"), (32, 32, 3), None),
      ("DiffiT image CIFAR-10 (H.1: 4/4/4)", dict(name="diffit_image", num_blocks=(4, 4, 4)), (32, 32, 3), None),
      ("DiffiT image FFHQ-64 (I.1: 1/2/2/2, window 8)",
       dict(name="diffit_image", channels=(128, 256, 256, 256), num_blocks=(1, 2, 2, 2), window_size=8),
       (64, 64, 3), None),
  ]
  out = []
  for name, cfg, shape, paper in rows:
    n = count_params(cfg, shape)
    out.append((name, n, n + pos_embed_size(cfg), paper, forward_gflops(cfg, shape)))
  return out


def main():
  print(f"{'model':<50} {'params (M)':>11} {'+pos-embed (M)':>15} {'paper (M)':>10} {'fwd GFLOP/img':>14}")
  for name, n, n_pos, paper, gf in table():
    print(f"{name:<50} {n / 1e6:>11.2f} {n_pos / 1e6:>15.2f} {paper if paper else '':>10} {gf:>14.1f}")


if __name__ == "__main__":
  main()
