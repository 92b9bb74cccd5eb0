"""The README's Python examples run as written (CI size: the engine example's 20 rounds are cut
to 2, its only change)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _python_blocks() -> list[str]:
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_the_engine_and_method_examples():
  blocks = _python_blocks()
  assert any("make_round" in b for b in blocks) and any("run_rounds" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index, capsys):
  code = _python_blocks()[index].replace("for r in range(20):", "for r in range(2):")
  namespace: dict = {}
  exec(compile(code, f"README.md python block {index}", "exec"), namespace)
  if "run_rounds" in code:  # the method example: pruned after round 5, and it learns
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 11, out
    params = [int(line.split("kept params ")[1]) for line in out[:10]]
    assert params[4] > params[5] == params[9]  # the one-shot prune before round 6
    assert eval(out[-1])["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
  else:
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.round_idx) == 2 and float(metrics["train_loss"]) > 0
