"""Name -> constructor registries. A wrong name fails with the list of valid names."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable


class Registry:
  """A small named registry: `@REG.register("name")` then `REG.get("name")`."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: Dict[str, Any] = {}

  def register(self, name: str) -> Callable[[Any], Any]:
    def deco(obj):
      if name in self._items and self._items[name] is not obj:
        raise KeyError(f"{self.kind} {name!r} is registered twice")
      self._items[name] = obj
      return obj
    return deco

  def get(self, name: str) -> Any:
    if name not in self._items:
      raise ValueError(
          f"Unknown {self.kind} {name!r}. Valid {self.kind} names: "
          f"{', '.join(sorted(self._items)) or '(none registered)'}.")
    return self._items[name]

  def names(self) -> Iterable[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items


def check_choice(kind: str, value: str, valid: Iterable[str]) -> str:
  """Raises a ValueError naming `kind` and listing `valid` if `value` is not one of them."""
  valid = list(valid)
  if value not in valid:
    raise ValueError(f"Unknown {kind} {value!r}. Valid {kind} names: {', '.join(map(str, valid))}.")
  return value
