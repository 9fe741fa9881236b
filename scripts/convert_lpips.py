"""Build the LPIPS weights file (safetensors) for `diffusion_jax.eval.lpips`, once.

    python scripts/convert_lpips.py --net alex --allow_pickle \\
        --heads .venv/lib/python3.11/site-packages/lpips/weights/v0.1/alex.pth \\
        --trunk alexnet-owt-7be5be79.pth  lpips_alex.safetensors

--heads: the lpips package's linear heads (weights/v0.1/<net>.pth, shipped inside the pip package).
--trunk: torchvision's ImageNet weights of the trunk (alexnet-owt-7be5be79.pth / vgg16-397923af.pth), whose
`features.<i>.*` entries are renamed to lpips' `net.slice<k>.<i>.*`; or a full `lpips.LPIPS().state_dict()`
saved as one file via --full instead of --heads/--trunk. Both .pth inputs are pickles: read (torch,
weights_only=True) only with --allow_pickle. The result is checked against the Flax network before writing.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.eval import lpips  # noqa: E402
from diffusion_jax.pretrained import io  # noqa: E402


def convert(dst: str, net: str, heads: str = "", trunk: str = "", full: str = "", allow_pickle: bool = False):
  if full:
    sd = io.load_state_dict(full, allow_pickle=allow_pickle)
  else:
    if not (heads and trunk):
      raise ValueError("give --heads and --trunk, or --full")
    sd = dict(io.load_state_dict(heads, allow_pickle=allow_pickle))
    sd.update(lpips.torchvision_features_to_lpips(io.load_state_dict(trunk, allow_pickle=allow_pickle), net))
  sd = {k: v for k, v in sd.items() if not k.startswith("scaling_layer.")}
  lpips.torch_to_flax(sd, net)  # raises naming missing / unexpected / mis-shaped entries
  io.save_state_dict(sd, dst, metadata={"format": "pt", "network": f"lpips v0.1 {net}"})
  return len(sd)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("dst")
  p.add_argument("--net", choices=sorted(lpips.NETS), default="alex")
  p.add_argument("--heads", default="")
  p.add_argument("--trunk", default="")
  p.add_argument("--full", default="")
  p.add_argument("--allow_pickle", action="store_true", help="allow reading pickle (.pth) inputs you trust")
  a = p.parse_args(argv)
  n = convert(a.dst, a.net, a.heads, a.trunk, a.full, a.allow_pickle)
  print(f"wrote {n} tensors to {a.dst}")


if __name__ == "__main__":
  main()
