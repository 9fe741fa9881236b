"""The adaLN arm of the TMSA-vs-adaLN ablation on the shapes world (DiffiT §5.9 / Fig. 7b, at small scale).

    python -m diffusion_jax.main --config configs/dit_shapes.py --workdir runs/dit_shapes

Same as `configs/diffit_shapes.py:adaln` (DiT with adaLN-Zero, width 64, depth 4, patch 2 on 16x16 pixels, EDM
objective); the TMSA arm is `configs/diffit_shapes.py:tmsa` at equal parameter count (MLP ratio 5.5 vs 4).
Variants: "" , "tiny", and ",seedN" as in diffit_shapes.py.
"""

from __future__ import annotations

import ml_collections

from configs import diffit_shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "").split(",") if p]
  tiny = "tiny" in parts
  seeds = [p for p in parts if p.startswith("seed")]
  if len(parts) != int(tiny) + len(seeds):
    raise ValueError(f"Unknown dit_shapes variant {arg!r}. Valid variants: '' (default), 'tiny', ',seedN'.")
  c = diffit_shapes.get_config(",".join(["adaln"] + seeds))
  if tiny:
    t = diffit_shapes.get_config("tiny")
    c.data, c.train, c.sample, c.eval = t.data, t.train, t.sample, t.eval
    c.model.update(hidden_size=16, depth=1, num_heads=2)
  return c
