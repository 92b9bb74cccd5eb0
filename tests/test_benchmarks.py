"""The engine benchmark runs in smoke size and writes a well-formed JSON table."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import engine  # noqa: E402


def test_engine_benchmark_smoke(tmp_path):
  out = str(tmp_path / "engine.json")
  result = engine.main(["--smoke", "--models", "leaf_femnist_cnn,logistic", "--out", out])
  with open(out) as f:
    saved = json.load(f)
  assert saved["rows"] == json.loads(json.dumps(result["rows"]))
  strategies = {(r["model"], r["strategy"]) for r in saved["rows"]}
  assert ("leaf_femnist_cnn", "loop+lax") in strategies and ("logistic", "vmap+lax") in strategies
  assert ("leaf_femnist_cnn", "sequential+tapgrad") in strategies
  for row in saved["rows"]:
    assert row["round_s"] > 0 and row["client_steps_per_s"] > 0 and row["gflops"] > 0
  assert saved["matmul_ceiling_gflops"] > 0
