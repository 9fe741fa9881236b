"""Samples a local Stable Diffusion pipeline directory with the project's samplers (no checkpoint needed).

    python scripts/sd_sample.py --config configs/sd15.py --pipeline /path/to/stable-diffusion-v1-5 \
        --out runs/sd15_samples [--prompt "a red cube" --prompt "..."] [--sampler ddim|dpmpp_2m|euler|unipc|...] \
        [--steps 25] [--guidance 7.5] [--bf16] [--num 8]

Writes OUT/<i>.png, OUT/samples.npz (images in [0, 1], token ids, initial latents) and OUT/prompts.json.
The whole loop (text encoder, sampler with batched classifier-free guidance, VAE decoder) runs in one jit.
(`python -m diffusion_jax.main --mode sample` does the same into a sample sheet + npz; this writes one PNG per
prompt.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise SystemExit(f"--config {path!r} does not exist (e.g. configs/sd15.py).")
  mod_spec = importlib.util.spec_from_file_location("_cfg", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/sd15.py")
  p.add_argument("--pipeline", required=True, help="a diffusers pipeline directory (model_index.json layout)")
  p.add_argument("--out", required=True)
  p.add_argument("--prompt", action="append", default=None)
  p.add_argument("--sampler", default=None)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--num", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=None)
  p.add_argument("--bf16", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  from diffusion_jax import stages as stages_lib
  from diffusion_jax.experiments.text_to_image import sample_to_dir
  c = _load_config(a.config)
  c.data.name = "prompts"
  c.data.cache_dir = os.path.join(a.out, "cache")
  if a.prompt:
    c.data.prompts = list(a.prompt)
  for key, val in (("sample.sampler", a.sampler), ("sample.steps", a.steps), ("sample.guidance", a.guidance),
                   ("data.image_size", a.image_size), ("data.batch_size", a.batch_size)):
    if val is not None:
      sec, k = key.split(".")
      c[sec][k] = val
  c.seed = a.seed
  if a.bf16:
    c.dtype = "bfloat16"
  stages = {"pipeline": stages_lib._from_path("pipeline", a.pipeline, "sd_pipeline")}
  print(sample_to_dir(c, stages, a.out, a.num))


if __name__ == "__main__":
  main()
