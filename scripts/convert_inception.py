"""Convert the FID Inception-v3 weights (pytorch-fid's published .pth) to a safetensors file, once.

    python scripts/convert_inception.py --allow_pickle pt_inception-2015-12-05-6726825d.pth inception_fid.safetensors

The input is the state dict of pytorch-fid's `fid_inception_v3()` (the file at pytorch-fid's FID_WEIGHTS_URL,
torchvision layer names such as `Mixed_5b.branch1x1.conv.weight`) or of pytorch-fid's `InceptionV3` module
(`blocks.<i>.<j>....`, renamed here). A .pth / .pt is a pickle: it is read (with torch, `weights_only=True`)
only with --allow_pickle. The output keeps the PyTorch names and layouts (any PyTorch user can read it);
`diffusion_jax.eval.inception.load_params` maps it to the Flax tree. Before writing, every name and shape is
checked against the Flax network, so a wrong file fails here and not at evaluation time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_jax.eval import inception  # noqa: E402
from diffusion_jax.pretrained import io  # noqa: E402


def convert(src: str, dst: str, *, allow_pickle: bool = False) -> dict:
  sd = io.load_state_dict(src, allow_pickle=allow_pickle)
  sd = inception._from_pytorch_fid_module({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})
  inception.torch_to_flax(sd)  # raises CheckpointError naming the missing / unexpected / mis-shaped entries
  with open(src, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  io.save_state_dict(sd, dst, metadata={"format": "pt", "source": os.path.basename(src), "source_sha256": sha,
                                        "network": "pytorch-fid FID Inception-v3 (pt_inception-2015-12-05)"})
  return {"tensors": len(sd), "source_sha256": sha, "out": dst}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="pytorch-fid weights (.pth, needs --allow_pickle) or a safetensors state dict")
  p.add_argument("dst", help="output .safetensors")
  p.add_argument("--allow_pickle", action="store_true",
                 help="allow reading a pickle (.pth/.pt/.bin) file; only for files from a source you trust")
  a = p.parse_args(argv)
  if not a.dst.endswith(".safetensors"):
    p.error(f"the output must be a .safetensors file, got {a.dst}")
  info = convert(a.src, a.dst, allow_pickle=a.allow_pickle)
  print(f"wrote {info['tensors']} tensors to {info['out']} (source sha256 {info['source_sha256']})")


if __name__ == "__main__":
  main()
