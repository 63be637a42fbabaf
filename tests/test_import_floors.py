"""Imports point down, never up (DESIGN: main -> train, evaluators; train -> methods, data,
sharding, checkpoint, optim; methods -> models, masking; evaluators -> models, data).

Every module of mim_jax/ has a floor below; each of its mim_jax imports must name a lower floor,
or a module of its own package (models/vit.py may import models/layers.py). A new module must be
given a floor here, which is the point: where it sits is a decision, not an accident."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mim_jax"

FLOORS = {
    # The bottom: no mim_jax imports, or only each other.
    "registry": 0, "tree_paths": 0, "pth": 0, "mixup": 0, "progress": 0, "final_results": 0,
    "metric_writer": 0, "errors": 0, "workdir_lock": 0, "checkpoint_damage": 0, "preemption": 0,
    "color_noise": 0, "layer_layout": 0, "compile_options": 0, "timed_rounds": 0,
    # Building blocks.
    "sharding": 1, "checkpoint": 1, "disk_full": 1, "optim": 1, "masking": 1, "frame_masking": 1,
    "data": 1,
    "models": 1,
    "flops": 2,        # counts the models' FLOPs
    "evaluators": 2,   # read features through a model they are given
    "hf_export": 2,    # an MAE's params under transformers' names (reads the models' shapes)
    "methods": 3,      # models + masks -> a loss
    "pretrained": 4,   # parameters that fit a method's model
    "init_from": 5,
    "train": 6, "evaluate": 6, "config_validation": 6,
    "main": 7, "bench": 7, "tools": 7,
}


def unit(module: str) -> str:
  """'mim_jax.models.vit' -> 'models' (the floor's key: a top-level module or package)."""
  return module.split(".")[1]


def mim_jax_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mim_jax"):
      if node.module == "mim_jax":  # from mim_jax import train
        out += [(node.lineno, f"mim_jax.{a.name}") for a in node.names]
      else:
        out.append((node.lineno, node.module))
    elif isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("mim_jax.")]
  return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
  relative = path.relative_to(PACKAGE)
  own = relative.parts[0].removesuffix(".py")
  if own == "__init__":
    return  # mim_jax/__init__.py
  assert own in FLOORS, f"{relative}: give the new module a floor in FLOORS"
  for line, module in mim_jax_imports(path):
    target = unit(module)
    assert target in FLOORS, f"{relative}:{line} imports {module}, which has no floor"
    if target == own:
      continue  # within its own package
    assert FLOORS[target] < FLOORS[own], (
        f"{relative}:{line} imports {module} (floor {FLOORS[target]}) from floor {FLOORS[own]}: "
        f"imports must point down")


def test_the_check_sees_imports():
  """Not vacuous: the trainer's imports are found, and one pointing up would be caught."""
  found = {unit(m) for _, m in mim_jax_imports(PACKAGE / "train.py")}
  assert {"methods", "data", "sharding", "checkpoint", "optim"} <= found
  assert FLOORS["methods"] > FLOORS["models"] and FLOORS["train"] > FLOORS["methods"]
