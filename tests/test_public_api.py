"""The curated public API: every package's `__all__`, the top-level imports, `py.typed`."""
import ast
import importlib
import os
import tomllib
import typing

import pytest

import fedjax_prune
from fedjax_prune import federated

PACKAGES = ["fedjax_prune"] + [f"fedjax_prune.{name}" for name in
                               ("data", "federated", "masks", "models", "performance", "pruning",
                                "structured")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported_public_names(module):
  """The public names the package's `__init__.py` binds by import statements."""
  with open(module.__file__) as f:
    body = ast.parse(f.read()).body
  names = set()
  for node in body:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
  return {n for n in names if not n.startswith("_") and n != "annotations"}


@pytest.mark.parametrize("name", PACKAGES)
def test_all_lists_exactly_the_reexported_names(name):
  module = importlib.import_module(name)
  assert hasattr(module, "__all__"), f"{name} has no __all__"
  public = list(module.__all__)
  assert len(public) == len(set(public)), f"{name}.__all__ has duplicates"
  for attr in public:
    assert hasattr(module, attr), f"{name}.__all__ names {attr!r}, which does not resolve"
  assert set(public) - {"__version__"} == _imported_public_names(module)


def test_top_level_imports_the_subpackages():
  for sub in ("data", "federated", "masks", "models", "performance", "pruning", "structured",
              "accounting", "checkpoint", "tree", "types"):
    assert sub in fedjax_prune.__all__
    assert getattr(fedjax_prune, sub) is importlib.import_module(f"fedjax_prune.{sub}")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    assert fedjax_prune.__version__ == tomllib.load(f)["project"]["version"]


def test_py_typed_is_shipped():
  assert os.path.isfile(os.path.join(os.path.dirname(fedjax_prune.__file__), "py.typed"))
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["fedjax_prune"]


def test_fed_algorithm_fields_are_typed_by_protocols():
  hints = typing.get_type_hints(federated.FedAlgorithm)
  assert hints == {"init": federated.InitFn, "client_update": federated.ClientUpdateFn,
                   "server_update": federated.ServerUpdateFn}
  for protocol in (federated.InitFn, federated.ClientUpdateFn, federated.ServerUpdateFn,
                   federated.ApplyFn):
    assert typing.get_type_hints(protocol.__call__)  # the annotations resolve
  # One apply-function type: what models build is what algorithms take.
  from fedjax_prune import models, types
  assert federated.ApplyFn is models.ApplyFn is types.ApplyFn
