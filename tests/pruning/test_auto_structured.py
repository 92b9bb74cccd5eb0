"""ASP: the boundary rule, the search state machine, re-init vs inheritance, no recompiles."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, federated, models, structured
from fedjax_prune.data import from_client_lists, to_device
from fedjax_prune.pruning import auto_structured as asp_lib
from fedjax_prune.pruning import l1_filter
from tests._checks import assert_counted_accuracy


def test_boundary_keep_hand_computed():
  s = np.array([1.0, 2.0, 3.0, 4.0, 10.0])  # mu = 4, sigma = sqrt(10) = 3.162
  np.testing.assert_array_equal(asp_lib.boundary_keep(s, 1.0), [True, True, True, True, False])
  np.testing.assert_array_equal(asp_lib.boundary_keep(s, 1.0, "lower"), [True] * 5)
  np.testing.assert_array_equal(asp_lib.boundary_keep(s, 0.9, "lower"), [False, True, True, True, True])
  np.testing.assert_array_equal(asp_lib.boundary_keep(s, 0.0), [False, False, False, True, False])
  # nothing inside the boundary: the filter nearest the mean survives
  np.testing.assert_array_equal(asp_lib.boundary_keep(np.array([1.0, 2.0, 10.0]), 0.0),
                                [False, True, False])


def _planted_cnn():
  """CNN [5, 4] whose filter L1 norms are set by hand."""
  spec = models.asp_femnist_cnn(widths=(5, 4), num_classes=3)
  params, stats = models.init_params(spec, jax.random.key(0))
  k0 = np.ones((5, 5, 1, 5), np.float32) * np.array([1, 1, 1, 1, 20], np.float32) / 25
  k1 = np.ones((5, 5, 5, 4), np.float32) * np.array([1, 2, 3, 4], np.float32) / 125
  params["conv_0"]["kernel"], params["conv_1"]["kernel"] = jnp.asarray(k0), jnp.asarray(k1)
  return spec, params, stats


def test_propose_uses_per_layer_l1_and_keeps_dense_layers():
  spec, params, _ = _planted_cnn()
  keep = asp_lib.auto_structured(k=1.0).propose(spec, params)
  assert set(keep) == {"conv_0", "conv_1"}  # the dense logits layer is never pruned
  np.testing.assert_array_equal(keep["conv_0"], [True, True, True, True, False])  # 20 > mu + sigma
  # scores 1..4: mu = 2.5, sigma = 1.118 -> [1.38, 3.62] keeps 2 and 3
  np.testing.assert_array_equal(keep["conv_1"], [False, True, True, False])
  keep_lower = asp_lib.auto_structured(k=1.0, tails="lower").propose(spec, params)
  np.testing.assert_array_equal(keep_lower["conv_1"], [False, True, True, True])


def test_step_state_machine_patience_and_hard_stop():
  spec, params, stats = _planted_cnn()
  key = jax.random.key(1)
  asp = asp_lib.auto_structured(k=100.0, max_patience=3, max_pruned_round=10)  # keeps everything
  state = asp.init()
  state, d = asp.step(state, spec, params, stats, 0, key)
  assert not d.accepted and d.keep is None and state.still_prune  # never before round 1
  for r in (1, 2):
    state, d = asp.step(state, spec, params, stats, r, key)
    assert not d.accepted and d.candidate_params == accounting.param_count(spec)
    assert state.patience == r and state.still_prune
  state, d = asp.step(state, spec, params, stats, 3, key)
  assert state.patience == 3 and not state.still_prune  # patience exhausted: phase 2
  state, d = asp.step(state, spec, params, stats, 4, key)
  assert d.keep is None and d.spec is spec
  stopper = asp_lib.auto_structured(k=0.1, max_pruned_round=2)
  state, d = stopper.step(stopper.init()._replace(patience=2), spec, params, stats, 3, key)
  assert not state.still_prune and not d.accepted and state.patience == 2  # round 3 > 2


def test_accept_resets_patience_reinit_vs_inherit():
  spec, params, stats = _planted_cnn()
  key = jax.random.key(5)
  reinit = asp_lib.auto_structured(k=1.0)
  state, d = reinit.step(reinit.init()._replace(patience=2), spec, params, stats, 1, key)
  assert d.accepted and state.patience == 0 and state.num_accepted == 1
  assert d.spec.convs[0].features == 4 and d.spec.convs[1].features == 2
  assert d.candidate_params == accounting.param_count(d.spec) < accounting.param_count(spec)
  want, _ = models.init_params(d.spec, key)  # the faithful default: fresh weights
  for a, b in zip(jax.tree.leaves(d.params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  # Inheriting the weights prunes the lower tail only (issue 23): conv_0's largest filter
  # (L1 20, the upper tail) stays, and conv_1 keeps its three largest. With both tails
  # (the old default here) it was removed, and round after round of removing the most
  # active filters killed the network on FEMNIST.
  inherit = asp_lib.auto_structured(k=1.0, reinit_on_prune=False)
  _, d2 = inherit.step(inherit.init(), spec, params, stats, 1, key)
  assert [c.features for c in d2.spec.convs] == [5, 3]
  np.testing.assert_array_equal(d2.params["conv_0"]["kernel"], np.asarray(params["conv_0"]["kernel"]))
  np.testing.assert_array_equal(d2.params["conv_1"]["kernel"],
                                np.asarray(params["conv_1"]["kernel"])[:, :, :, 1:4])
  with pytest.raises(ValueError, match=r"upper tail.*tails='lower'"):
    asp_lib.auto_structured(k=1.0, tails="both", reinit_on_prune=False)


def test_rounds_between_prunes():
  spec, params, stats = _planted_cnn()
  asp = asp_lib.auto_structured(k=100.0, rounds_between_prunes=2)
  state, d = asp.step(asp.init(), spec, params, stats, 1, jax.random.key(0))
  assert d.keep is None
  state, d = asp.step(state, spec, params, stats, 2, jax.random.key(0))
  assert d.keep is not None and state.last_decision_round == 2


def test_resnet_streams_follow_the_stem_count():
  spec = models.asp_resnet(widths=(6, 5, 7), input_shape=(20, 20, 3))
  params, stats = models.init_params(spec, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.1, 1.0, p.shape).astype(np.float32)),
                        params)
  scored, follows = asp_lib.prunable_groups(spec)
  assert scored == ["stem/conv", "stage1_block0/conv1", "stage2_block0/conv1"]
  assert follows == {"stage1_block0/conv2": "stem/conv", "stage2_block0/conv2": "stem/conv"}
  keep = asp_lib.auto_structured(k=0.5).propose(spec, params)
  n = int(keep["stem/conv"].sum())
  out = structured.shrink(spec, params, keep, batch_stats=stats)
  assert out.spec.stem_width == n and out.spec.stage_widths == (n, n)  # one stream width, as the paper


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="k must be"):
    asp_lib.auto_structured(k=-1.0)
  with pytest.raises(ValueError, match="tails must be one of.*or None"):
    asp_lib.auto_structured(tails="upper")
  with pytest.raises(ValueError, match="max_patience must be an int >= 1"):
    asp_lib.auto_structured(max_patience=0)
  with pytest.raises(ValueError, match="MLPSpec has none"):
    asp_lib.prunable_groups(models.mlp())
  with pytest.raises(ValueError, match="ratio must be"):
    l1_filter.l1_filter_keep(models.asp_femnist_cnn(), {}, 1.0)


def test_l1_filter_keeps_the_largest_filters_fixed_ratio():
  spec, params, _ = _planted_cnn()
  keep = l1_filter.l1_filter_keep(spec, params, 0.5)
  # round(0.5 * 5) = 2 filters: the L1-20 one and the first of the tied ones
  np.testing.assert_array_equal(keep["conv_0"], [True, False, False, False, True])
  np.testing.assert_array_equal(keep["conv_1"], [False, False, True, True])
  out = l1_filter.l1_filter_prune(spec, params, 0.5)
  assert [c.features for c in out.spec.convs] == [2, 2]


def _tiny_data(num_clients=3, shape=(16, 16, 1), classes=3, n=6):
  rng = np.random.default_rng(0)
  xs = [rng.uniform(size=(n,) + shape).astype(np.float32) for _ in range(num_clients)]
  ys = [rng.integers(0, classes, n).astype(np.int32) for _ in range(num_clients)]
  return to_device(from_client_lists(xs, ys))


def test_rebuild_compiles_once_and_round_two_does_not_recompile():
  """Each accepted prune re-jits the round once; later rounds of that architecture reuse it."""
  spec = models.asp_femnist_cnn(widths=(6, 8), num_classes=3, input_shape=(16, 16, 1))
  params, stats = models.init_params(spec, jax.random.key(0))
  data = _tiny_data()
  schedule = federated.LocalSchedule(batch_size=3)
  asp = asp_lib.auto_structured(k=0.5)
  cohort = federated.make_cohort([0, 1, 2])

  def make(spec):
    alg = federated.fedavg(models.make_apply(spec), optax.adam(1e-3), schedule)
    return alg, federated.make_round(alg, execution=federated.Vmap())

  alg, round_fn = make(spec)
  server = alg.init(params, jax.random.key(1), batch_stats=stats)
  server, _ = round_fn(server, data, cohort, jax.random.key(0))
  state, d = asp.step(asp.init(), spec, server.params, server.batch_stats, 1, jax.random.key(2))
  assert d.accepted
  alg, round_fn = make(d.spec)
  server = alg.init(d.params, jax.random.key(1), batch_stats=d.batch_stats)
  for r in (1, 2, 3):
    server, metrics = round_fn(server, data, cohort, jax.random.key(r))
    assert round_fn._cache_size() == 1
  assert bool(metrics["finite"])
  assert server.params["conv_0"]["kernel"].shape[-1] == d.spec.convs[0].features


def _tiny_asp_config(method="asp"):
  from experiments.configs import asp_tiny
  c = asp_tiny.get_config()
  c.method = method
  c.data.num_clients = 6
  c.clients_per_round = 3
  c.rounds = 3
  c.eval_every = 3
  c.asp.max_pruned_round = 1
  c.l1_filter.prune_round = 1
  return c


@pytest.mark.slow  # ~30 s: compiles the round twice and the evaluator twice
@pytest.mark.parametrize("method", ["asp", "l1_filter"])
def test_driver_smoke_records_phase_size_and_bytes(tmp_path, method):
  from experiments import train
  config = _tiny_asp_config(method)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["round"] for r in records] == [1, 2, 3]
  first = "search" if method == "asp" else "dense"
  assert records[0]["phase"] == first and records[-1]["phase"] == "train"
  assert records[1]["accepted"] == 1 and records[1]["params"] < records[0]["params"]
  dense = records[0]["bytes_up"] + records[0]["bytes_down"]
  assert records[-1]["dense_cum_bytes"] == 3 * dense
  assert records[-1]["cum_bytes"] == sum(r["bytes_up"] + r["bytes_down"] for r in records)
  assert summary["communication_ratio"] == pytest.approx(3 * dense / records[-1]["cum_bytes"])
  assert summary["params"] == records[-1]["params"] < summary["dense_params"]
  assert_counted_accuracy(summary["test_accuracy"], config)


def test_driver_rejects_bad_asp_fields(tmp_path):
  from experiments import build, train
  c = _tiny_asp_config()
  c.asp.tails = "upper"
  with pytest.raises(build.ConfigError, match="config.asp.tails='upper' is invalid"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  c = _tiny_asp_config()
  c.model.name = "mlp"
  with pytest.raises(build.ConfigError, match="config.model.name='mlp' is invalid"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  c = _tiny_asp_config()
  c.asp.reinit_on_prune = False  # with tails='both' (asp_fields'): the network-killing combination
  with pytest.raises(build.ConfigError, match=r"tails='both' with config.asp.reinit_on_prune=False"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  c = _tiny_asp_config()
  c.asp.kernel_init = "he_normal"
  with pytest.raises(build.ConfigError, match=r"config.asp.kernel_init='he_normal' is invalid"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # refused before anything was written


def test_asp_kernel_init_glorot_is_the_keras_rule():
  """config.asp.kernel_init='glorot_uniform' (the faithful configs'): every kernel
  U(+-sqrt(6 / (fan_in + fan_out))), the Keras default of the official code."""
  from experiments.configs import asp_femnist_cnn
  from experiments.methods import asp as asp_driver
  config = asp_femnist_cnn.get_config()
  assert config.asp.kernel_init == "glorot_uniform"
  spec = models.asp_femnist_cnn()
  params, _ = asp_driver.init_fn(config)(spec, jax.random.key(0))
  for name in ("conv_0", "conv_1", "dense_0"):
    kernel = np.asarray(params[name]["kernel"])
    fan_in, fan_out = np.prod(kernel.shape[:-1]), kernel.shape[-1]
    if kernel.ndim == 4:
      fan_out *= np.prod(kernel.shape[:2])  # Keras: receptive field x output channels
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit, name
  # The library's default (the PyTorch rule) draws conv_1 within 1/sqrt(fan_in) = 0.035,
  # glorot within sqrt(6 / (800 + 1600)) = 0.05: the option changes the start.
  default, _ = models.init_params(spec, jax.random.key(0))
  assert np.abs(np.asarray(default["conv_1"]["kernel"])).max() <= 1 / np.sqrt(800) + 1e-7
  assert np.abs(np.asarray(params["conv_1"]["kernel"])).max() > 0.045


@pytest.mark.slow  # ~40 s: a run plus a resume
def test_driver_resume_rebuilds_the_pruned_shapes(tmp_path):
  """The checkpoint meta holds the spec: a resumed run restores into the pruned shapes."""
  from experiments import train
  c = _tiny_asp_config()
  c.checkpoint_every = 1
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(c, workdir)
  assert first["params"] < first["dense_params"]
  again = train.train_and_evaluate(c, workdir, resume=True)
  assert again["spec"] == first["spec"] and again["params"] == first["params"]
  assert again["test_accuracy"] == first["test_accuracy"]
