"""Configs by name (diffusion_jax/named_configs.py) and the packaging that ships them in the wheel."""

from __future__ import annotations

import configparser
import os

import pytest

from diffusion_jax import named_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def test_shipped_dir_is_this_projects_configs():
  assert named_configs.shipped_config_dir() == CONFIGS
  names = named_configs.list_configs()
  assert "eclipse_prior" in names and "diffit_cifar10" in names
  assert not [n for n in names if n.startswith("_")]  # _base, _sd are helpers, not tasks


def test_existing_path_is_unchanged(tmp_path, monkeypatch):
  own = tmp_path / "mine.py"
  own.write_text("def get_config(arg=None):\n  return None\n")
  assert named_configs.resolve_config(f"{own}:tiny") == f"{own}:tiny"
  monkeypatch.chdir(ROOT)
  assert named_configs.resolve_config("configs/eclipse_prior.py:tiny") == "configs/eclipse_prior.py:tiny"


@pytest.mark.parametrize("spec", ["eclipse_prior:tiny", "eclipse_prior.py:tiny", "configs/eclipse_prior.py:tiny"])
def test_names_resolve_outside_a_clone(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: the documented command as run without a clone
  assert named_configs.resolve_config(spec) == os.path.join(CONFIGS, "eclipse_prior.py") + ":tiny"
  assert named_configs.resolve_argv(["main", f"--config={spec}", "--workdir=w"])[1] == (
      "--config=" + os.path.join(CONFIGS, "eclipse_prior.py") + ":tiny")
  assert named_configs.resolve_argv(["main", "--config", spec])[2].endswith("eclipse_prior.py:tiny")


def test_resolved_name_loads(tmp_path, monkeypatch):
  from diffusion_jax.train.config_loading import load_config
  monkeypatch.chdir(tmp_path)
  config = load_config(named_configs.resolve_config("diffit_shapes:tiny"))
  assert config.experiment == "generation"


@pytest.mark.parametrize("spec", ["no_such_config", "configs/_base.py", "configs/no_such.py:tiny",
                                  "my/own/eclipse_prior.py"])  # a missing file of the user's is not replaced
def test_unknown_name_lists_the_shipped_ones(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="Shipped configs: .*eclipse_prior"):
    named_configs.resolve_config(spec)


def test_setup_cfg_ships_the_configs_package():
  """What the wheel will hold: setuptools' package discovery with setup.cfg's own settings."""
  from setuptools import find_namespace_packages, find_packages
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  include = [p.strip() for p in cfg["options.packages.find"]["include"].split() if p.strip()]
  finder = {"find_namespace:": find_namespace_packages, "find:": find_packages}[cfg["options"]["packages"].strip()]
  packages = finder(ROOT, include=include)
  assert "configs" in packages and "diffusion_jax" in packages
  assert "tests" not in packages and "scripts" not in packages
  assert "gcsfs" in cfg["options.extras_require"]["gcp"]
