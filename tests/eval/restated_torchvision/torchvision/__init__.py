"""Test-only stand-in for the few torchvision pieces that pytorch-fid and lpips call (NOT torchvision).

torchvision from PyPI does not import beside this project's CPU torch wheel, so the parity tests put this
directory on sys.path while importing the *real* `pytorch_fid` / `lpips` packages. It re-states, in plain
torch, only the architectures those packages subclass or build (torchvision's Inception3 and its blocks;
AlexNet / VGG16 `features`), with torchvision's module names, so that state-dict keys are torchvision's.
Pretrained-weight download is not supported (tests use random weights).
"""

__version__ = "0.21.0"  # what pytorch-fid's version switch reads (>= 0.13: `weights=` API, init_weights=False)

from . import models  # noqa: E402,F401
