"""Runs the docstring examples (`>>>`) of every fedjax_prune module: the public
factories' examples are part of the documentation and must stay true."""
import doctest
import importlib
import pkgutil

import pytest

import fedjax_prune


def _modules_with_examples():
  names = []
  for info in pkgutil.walk_packages(fedjax_prune.__path__, prefix="fedjax_prune."):
    spec = importlib.util.find_spec(info.name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
      continue
    with open(spec.origin) as f:
      if ">>>" in f.read():
        names.append(info.name)
  return sorted(names)


MODULES = _modules_with_examples()


def test_some_modules_have_examples():
  assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  tests = [t for t in finder.find(module, name) if t.examples]
  assert tests, f"{name} mentions '>>>' but has no runnable examples"
  for test in tests:
    runner.run(test)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name} (output above)"
