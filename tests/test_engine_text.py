"""benchmarks/engine.py on the text models (issue 27): token data, the loop baseline that
does the engine round's work computes that round, and the smoke run's rows are consistent."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, BENCH)

import engine  # noqa: E402

from fedjax_prune import accounting, models  # noqa: E402


def test_text_data_are_token_windows():
  spec = engine.model_specs(True)["shakespeare_lstm"]
  data = engine.make_data(spec, 3, 2, 4, spec.num_classes)
  assert data.x.shape == (3, 8, spec.seq_len) and data.x.dtype == jnp.int32
  assert int(data.x.min()) >= 0 and int(data.x.max()) < spec.vocab_size
  assert len(np.unique(np.asarray(data.x))) > spec.vocab_size // 2  # not a constant
  models.check_text_inputs(spec, np.asarray(data.x))


@pytest.mark.slow  # ~15 s on a loaded 2-core CPU (two LSTM compilations)
def test_shuffled_loop_computes_the_engine_round_for_the_lstm():
  spec = engine.model_specs(True)["shakespeare_lstm"]
  _, params, batch_stats = models.build(spec, jax.random.key(0))
  data = engine.make_data(spec, 3, 2, 8, spec.num_classes)
  data = data._replace(num_examples=jnp.asarray([16, 11, 5], jnp.int32))  # a partial batch
  strategy = engine.performance.Strategy.from_name("sequential+lax")
  got = engine.engine_round(spec, params, data, 2, 8, strategy, batch_stats=batch_stats)().params
  want, _ = engine.shuffled_loop_round(spec, params, data, 2, 8, "lax", batch_stats)()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))]
  assert all(moved)  # every leaf trained (a round that changed nothing would also "match")


@pytest.mark.slow  # ~30 s: two text models, loop + vmap, sharded too when devices allow
def test_engine_smoke_text_models(tmp_path):
  out = str(tmp_path / "engine.json")
  engine.main(["--smoke", "--models", "shakespeare_lstm,shakespeare_transformer",
               "--strategies", "vmap+lax", "--no-shuffled-loop", "--out", out])
  with open(out) as f:
    saved = json.load(f)
  strategies = {(r["model"], r["strategy"]) for r in saved["rows"]}
  for name in ("shakespeare_lstm", "shakespeare_transformer"):
    assert {(name, "loop+lax"), (name, "vmap+lax")} <= strategies
  for row in saved["rows"]:
    assert row["status"] == "ok"
    spec = engine.model_specs(True)[row["model"]]
    flops = accounting.training_flops(spec, saved["batch"]) * row["cohort"] * saved["steps"]
    assert row["gflops"] == pytest.approx(flops / row["round_s"] / 1e9)
