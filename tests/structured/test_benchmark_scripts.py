"""benchmarks/deploy.py and benchmarks/pruned_speed.py run in smoke size and check themselves."""
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")
sys.path.insert(0, BENCH)


@pytest.mark.slow  # ~20 s each on a shared 2-core CPU
def test_deploy_smoke(tmp_path):
  pytest.importorskip("flatbuffers")  # jax.export serialization needs it
  import deploy
  out = str(tmp_path / "deploy.json")
  result = deploy.main(["--smoke", "--out", out])
  with open(out) as f:
    saved = json.load(f)
  dense, pruned = saved["rows"]
  assert pruned["params"] < dense["params"] and pruned["flops"] < dense["flops"]
  assert all(r["export_max_abs_diff"] <= 1e-5 and r["params_roundtrip_exact"] for r in saved["rows"])
  assert result["ratios"]["surgery_max_abs_diff"] <= 1e-5
  assert result["ratios"]["params_ratio"] == pytest.approx(pruned["params"] / dense["params"])


@pytest.mark.slow
def test_pruned_speed_smoke(tmp_path):
  import pruned_speed
  out = str(tmp_path / "speed.json")
  result = pruned_speed.main(["--smoke", "--out", out])
  row = result["rows"][0]
  assert row["flop_ratio"] > 1 and row["efficiency"] == pytest.approx(row["speedup"] / row["flop_ratio"])
