"""Imports the real `pytorch_fid` / `lpips` packages (installed --no-deps by `make venv-test`) for parity tests.

Both import torchvision only for backbone *definitions*; torchvision cannot be installed beside this project's
CPU torch wheel, so `restated_torchvision/` (a plain-torch re-statement of the few torchvision layers they use,
with torchvision's module names) is put on sys.path for the import and removed from sys.modules afterwards, so
nothing else in the test session sees it.
"""

import importlib
import importlib.util
import os
import sys

import pytest

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "restated_torchvision")


def import_reference(name: str):
  pytest.importorskip("torch")
  top = name.split(".")[0]
  if importlib.util.find_spec(top) is None:  # not imported here: it would need torchvision
    pytest.skip(f"{top} is not installed (`make venv-test` installs it with --no-deps)")
  if name in sys.modules:
    return sys.modules[name]
  saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
  for k in saved:
    del sys.modules[k]
  sys.path.insert(0, _HERE)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(_HERE)
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
      del sys.modules[k]
    sys.modules.update(saved)
