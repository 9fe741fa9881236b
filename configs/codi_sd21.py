"""CoDi at paper scale on Stable Diffusion 2.1 (v-prediction, 768 px; the fast-codi README's base), experiment
"codi". Everything as `configs/codi_sd15.py` (same variants and hyper-parameters) except the base:

    python -m diffusion_jax.main --config configs/codi_sd21.py:edge,pe --workdir runs/codi_sd21_edge \
        --config.stages.pipeline.path=/path/to/stable-diffusion-2-1 --config.data.data_dir=/path/to/images

(the release trains at 512 px on SD-2.1: add --config.data.image_size=512).
"""

from __future__ import annotations

from configs.codi_sd15 import codi_sd_config


def get_config(arg=None):
  return codi_sd_config(arg, name="codi_sd21", prediction_type="v_prediction", image_size=768)
