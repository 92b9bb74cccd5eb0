"""CI for colab/*.ipynb: every notebook's code cells run, and outputs are stripped.

Conventions (colab/README.md): cells tagged `skip-ci` (the pinned install cell) are
skipped; the other code cells run in order with `exec` in one fresh Python process
(no Jupyter kernel needed), with FEDJAX_PRUNE_NOTEBOOK_CI=1 so notebooks pick tiny
sizes, the Agg matplotlib backend, and the repository root as working directory.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
SKIP_TAG = "skip-ci"

# Runs the code cells of the notebook named in argv[1], reporting the failing cell.
_RUNNER = r"""
import json, sys, traceback
nb = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for index, cell in enumerate(nb["cells"]):
  if cell["cell_type"] != "code" or "skip-ci" in cell.get("metadata", {}).get("tags", []):
    continue
  source = "".join(cell["source"])
  magic = [l for l in source.splitlines() if l.lstrip().startswith(("%", "!"))]
  if magic:
    sys.exit(f"cell {index}: IPython magic/shell line {magic[0]!r} outside a skip-ci cell")
  try:
    exec(compile(source, f"<cell {index}>", "exec"), namespace)
  except BaseException:
    traceback.print_exc()
    sys.exit(f"cell {index} failed")
print("ok")
"""


def _load(path):
  with open(path) as f:
    return json.load(f)


def test_there_is_a_quickstart():
  assert os.path.join(ROOT, "colab", "quickstart.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_outputs_are_stripped(path):
  for index, cell in enumerate(_load(path)["cells"]):
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [], f"{os.path.basename(path)} cell {index} has outputs"
      assert cell.get("execution_count") is None, (
          f"{os.path.basename(path)} cell {index} has an execution count")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_has_a_tagged_install_cell(path):
  code = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
  assert code and SKIP_TAG in code[0].get("metadata", {}).get("tags", []), (
      f"{os.path.basename(path)}: the first code cell must be the pinned install cell, "
      f"tagged {SKIP_TAG!r}")
  assert "pip install" in "".join(code[0]["source"])


# Running a notebook costs its tiny runs' compiles (45-90 s each on a 2-core CPU): the default
# suite runs the quickstart, the text notebook and FedTiny's; the other method notebooks run
# with -m slow (their library calls and configs have their own tests in the default suite).
SLOW_NOTEBOOKS = ("asp.ipynb", "cavp.ipynb", "fiarse.ipynb")


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.slow) if os.path.basename(p) in SLOW_NOTEBOOKS else p
    for p in NOTEBOOKS], ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  env = dict(os.environ, FEDJAX_PRUNE_NOTEBOOK_CI="1", MPLBACKEND="Agg", TMPDIR=str(tmp_path),
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  result = subprocess.run([sys.executable, "-c", _RUNNER, path], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and result.stdout.rstrip().endswith("ok"), (
      f"{os.path.basename(path)}: {result.stderr[-4000:]}")
