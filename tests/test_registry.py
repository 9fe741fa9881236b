"""Registries fail on unknown names with the list of valid names."""

import pytest

from diffusion_jax.registry import Registry, check_choice


def test_registry_get_and_error_lists_names():
  reg = Registry("widget")

  @reg.register("b")
  def make_b():
    return "b"

  reg.register("a")(lambda: "a")
  assert reg.get("b") is make_b and "a" in reg and list(reg.names()) == ["a", "b"]
  with pytest.raises(ValueError, match=r"Unknown widget 'c'\. Valid widget names: a, b\."):
    reg.get("c")
  with pytest.raises(KeyError, match="registered twice"):
    reg.register("b")(lambda: None)


def test_check_choice():
  assert check_choice("mode", "x", ["x", "y"]) == "x"
  with pytest.raises(ValueError, match="Valid mode names: x, y"):
    check_choice("mode", "z", ["x", "y"])
