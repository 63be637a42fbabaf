"""The one registry style: a dict from name to module or function, whose unknown-name error lists
the valid names. Models, methods, masks, evaluators and data sources all use it.

  METHODS = Registry("method", {"mae": mae, "simmim": simmim})
  METHODS["mae"]       # the module
  METHODS["maee"]      # ValueError: unknown method 'maee'; valid: ['mae', 'simmim']

It lives at the bottom floor (it imports nothing of mim_jax), so any layer may use it.
"""

from typing import Any


class Registry(dict):
  """A plain dict, except that a missing name raises ValueError naming `what` and the valid
  names (a config error, reported in one line, rather than a bare KeyError)."""

  def __init__(self, what: str, entries: dict[str, Any]):
    super().__init__(entries)
    self.what = what

  def __missing__(self, name: str) -> Any:
    raise ValueError(f"unknown {self.what} {name!r}; valid: {self.names()}")

  def names(self) -> list[str]:
    return sorted(self)
