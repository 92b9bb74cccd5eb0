"""Smoke test of the main job and the config validation (bad input -> clear errors)."""
import json
import os

import pytest

from experiments import build, train
from experiments.configs import fedavg_synthetic
from fedjax_prune import performance


def tiny_config():
  c = fedavg_synthetic.get_config()
  c.data.num_clients = 6
  c.data.examples_per_client = (6, 10)
  c.data.test_examples_per_client = 4
  c.model.name = "mlp"
  c.model.hidden = (16,)
  c.client.batch_size = 4
  c.rounds = 2
  c.clients_per_round = 3
  c.eval_every = 1
  c.strategy = "vmap+lax"
  c.progress = False
  return c


def test_main_job_smoke(tmp_path):
  workdir = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny_config(), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  assert [l["round"] for l in lines] == [1, 2]
  # Accuracy is a count over the pooled test set (24 examples): an exact multiple of 1/24 (a
  # mean of padded per-batch means, or a NaN, is not).
  num_test = len(build.build_data(tiny_config()).test_y)
  assert num_test == 24
  for l in lines:
    correct = l["test_accuracy"] * num_test
    assert abs(correct - round(correct)) < 1e-4, l["test_accuracy"]
  dense = 28 * 28 * 16 + 16 + 16 * 10 + 10
  assert summary["params"] == dense
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  for l in lines:  # size, communication and wall time in every record
    assert l["params"] == dense and l["flops"] > 2 * dense - 100
    assert l["bytes_up"] == l["bytes_down"] == 4 * dense * 3  # float32, 3 clients, dense
    assert l["wall_time"] > 0
  assert summary["bytes_up_per_round"] == 4 * dense * 3


def test_workdir_with_other_config_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config(), workdir)
  other = tiny_config()
  other.client.learning_rate = 0.5
  with pytest.raises(FileExistsError, match="different config"):
    train.train_and_evaluate(other, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["client"]["learning_rate"] == 0.05


@pytest.mark.parametrize("field,value,message", [
    ("rounds", 0, "config.rounds=0 is invalid: allowed an integer in \\[1, inf\\]"),
    ("clients_per_round", 7, "clients_per_round=7 exceeds data.num_clients=6"),
    ("client.learning_rate", -0.1, "config.client.learning_rate=-0.1 is invalid"),
    ("client.learning_rate", float("nan"), "client.learning_rate=nan is invalid"),
    ("client.batch_size", 0, "client.batch_size=0 is invalid"),
    ("client.optimizer", "rmsprop", "client.optimizer='rmsprop' is invalid: allowed one of"),
    ("client.momentum", 1.5, "client.momentum=1.5 is invalid"),
    ("model.name", "resnet9000", "model.name='resnet9000' is invalid"),
    ("model.norm", "layer", "model.norm='layer' is invalid"),
    ("algorithm.name", "scaffold", "algorithm.name='scaffold' is invalid"),
    ("data.name", "mnist", "data.name='mnist' is invalid"),
    ("data.label_skew_alpha", 0.0, "data.label_skew_alpha=0.0 is invalid: allowed a finite number in \\(0"),
    ("data.examples_per_client", (10, 5), "data.examples_per_client"),
    ("seeds.init", -1, "seeds.init=-1 is invalid"),
    ("eval_every", 0, "eval_every=0 is invalid"),
    ("strategy", "turbo", "config.strategy='turbo' is invalid"),
])
def test_bad_config_values_name_the_field(tmp_path, field, value, message):
  c = tiny_config()
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  workdir = tmp_path / "run"
  with pytest.raises(build.ConfigError, match=message):
    train.train_and_evaluate(c, str(workdir))
  assert not workdir.exists()  # nothing written before validation


def test_missing_data_dir_is_named(tmp_path):
  c = tiny_config()
  c.data.name = "femnist_leaf"
  c.data.data_dir = str(tmp_path / "nope")
  with pytest.raises(build.ConfigError, match="is not an existing directory"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


def test_divergence_raises_a_clear_error(tmp_path):
  c = tiny_config()
  c.client.learning_rate = 1e30
  with pytest.raises(FloatingPointError, match="diverged at round 1"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


def test_tensorboard_scalars_are_written(tmp_path):
  pytest.importorskip("tensorboardX")
  c = tiny_config()
  c.tensorboard = True
  workdir = tmp_path / "run"
  train.train_and_evaluate(c, str(workdir))
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1
  data = events[0].read_bytes()
  assert b"train_loss" in data and b"test_accuracy" in data and b"bytes_up" in data


def test_auto_strategy_times_sharded_and_unsharded_candidates_on_cpu(tmp_path, capsys):
  import jax
  if jax.device_count() < 4 or jax.default_backend() != "cpu":
    pytest.skip("needs 4 (fake) CPU devices")
  c = tiny_config()
  c.clients_per_round = 4  # a device per client: the run gets a mesh
  c.strategy = "auto"
  c.strategy_cache = str(tmp_path / "strategy.json")
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  log = capsys.readouterr().out
  timed = [line.split()[1] for line in log.splitlines() if line.strip().startswith("strategy ")]
  assert "sequential+lax+sharded" in timed and "sequential+lax" in timed
  assert summary["strategy"] in timed
  with open(c.strategy_cache) as f:
    ((key, entry),) = json.load(f).items()
  # The key names the mesh, the server statistic (a robust one is timed apart) and the
  # factored layers '+lowrank' candidates would use (the tiny MLP has no dense kernel worth
  # factoring, so none are timed).
  assert entry["best"] == summary["strategy"]
  assert key.endswith("|mesh=4|method=fedavg|server=mean|lowrank="), key
  assert not any("lowrank" in name for name in timed)


def test_strategy_cache_key_names_the_server_statistic():
  """Runs whose server step differs (a robust statistic, DP, compression) are timed apart:
  the cached choice of a mean round must not be reused for a trimmed-mean round."""
  from experiments import runtime
  from experiments.configs import dp_tiny, robust_tiny
  assert runtime.server_statistic_tag(tiny_config()) == "method=fedavg|server=mean"
  tags = {runtime.server_statistic_tag(robust_tiny.get_config(f"fedavg,{aggregator}"))
          for aggregator in ("median", "trimmed_mean", "krum")}
  assert tags == {"method=fedavg|server=median", "method=fedavg|server=trimmed_mean",
                  "method=fedavg|server=krum"}
  assert runtime.server_statistic_tag(dp_tiny.get_config()).endswith("+dp")


def test_auto_candidates_shard_only_what_can_win_on_a_one_core_device():
  from experiments import runtime
  names = lambda **kw: [s.name for s in runtime.auto_candidates(**kw)]
  conv = names(cohort_size=10, has_conv=True, unroll=2, lowrank=True, has_mesh=True, backend="cpu")
  sharded = [n for n in conv if n.endswith("+sharded")]
  # every sequential candidate without written-out steps is timed sharded too ...
  assert sharded == ["sequential+tapgrad+sharded", "sequential+tapgrad+lowrank+sharded",
                     "sequential+im2col+sharded"]
  # ... and everything is timed unsharded, vectorised conv rounds included
  unsharded = [n for n in conv if not n.endswith("+sharded")]
  assert unsharded == [s.name for s in performance.candidate_strategies(
      cohort_size=10, has_conv=True, backend="cpu", unroll=2, lowrank=True)]
  assert {"vmap+im2col", "chunked2+im2col", "chunked4+im2col"} <= set(unsharded)
  # a dense model's vectorised rounds can win sharded (dispatch-bound): kept
  mlp = names(cohort_size=32, has_conv=False, unroll=1, lowrank=False, has_mesh=True, backend="cpu")
  assert {"vmap+lax+sharded", "chunked8+lax+sharded", "vmap+lax", "sequential+lax"} <= set(mlp)
  # without a mesh nothing is sharded; on accelerators every candidate is sharded
  assert not any(n.endswith("+sharded") for n in
                 names(cohort_size=10, has_conv=True, unroll=1, lowrank=False, has_mesh=False,
                       backend="cpu"))
  gpu = names(cohort_size=64, has_conv=True, unroll=1, lowrank=False, has_mesh=True, backend="gpu")
  assert gpu and all(n.endswith("+sharded") for n in gpu) and "vmap+im2col+sharded" in gpu


def test_named_strategy_is_sharded_exactly_when_the_run_has_a_mesh():
  from experiments import runtime
  env = runtime.Env(config=None, workdir="", data=None, mesh="a mesh", cohort_multiple=4,
                    metrics=None, checkpoint=None, log=print)
  strategy = runtime.named_strategy(env, "sequential+lax")
  assert strategy.sharded and runtime.mesh_for(env, strategy) == "a mesh"
  alone = env._replace(mesh=None, cohort_multiple=1)
  assert not runtime.named_strategy(alone, "sequential+lax").sharded
  assert runtime.mesh_for(alone, performance.Strategy.from_name("vmap+lax")) is None
  with pytest.raises(ValueError, match="no device mesh"):
    runtime.mesh_for(alone, performance.Strategy.from_name("vmap+lax+sharded"))


def test_build_lowrank_only_for_runs_it_reproduces():
  from fedjax_prune import models as models_lib
  build_lib = build
  config = fedavg_synthetic.get_config()
  spec = models_lib.leaf_femnist_cnn()
  shapes, _ = models_lib.param_shapes(spec)
  config.client.optimizer, config.client.momentum, config.algorithm.name = "sgd", 0.0, "fedavg"
  config.client.batch_size, config.client.num_epochs, config.client.num_steps = 32, 1, 4
  got = build_lib.build_lowrank(config, spec, shapes, max_examples=100)
  assert got is not None and got.layers == ("dense_0",)
  assert got.learning_rate == config.client.learning_rate
  assert got.rows == 4 * 32  # the run's rows, also used by the short calibration rounds
  assert got.momentum == 0.0
  config.client.momentum = 0.9  # heavy-ball momentum: the factors' row weights follow it
  assert build_lib.build_lowrank(config, spec, shapes, max_examples=100).momentum == 0.9
  config.client.optimizer = "adam"  # Adam's per-coordinate scaling is not low-rank
  assert build_lib.build_lowrank(config, spec, shapes, max_examples=100) is None
  config.client.optimizer, config.client.momentum, config.algorithm.name = "sgd", 0.0, "fedprox"
  assert build_lib.build_lowrank(config, spec, shapes, max_examples=100) is None
  config.algorithm.name = "fedavg"
  assert build_lib.build_lowrank(config, models_lib.resnet20(), models_lib.param_shapes(
      models_lib.resnet20())[0], max_examples=100) is None


def test_named_lowrank_strategy_on_a_run_that_cannot_use_it_is_refused(tmp_path):
  c = tiny_config()
  c.strategy = "sequential+lax+lowrank"  # the tiny MLP has no dense kernel worth factoring
  with pytest.raises(ValueError, match="'\\+lowrank'.*this run is not one"):
    train.train_and_evaluate(c, str(tmp_path / "run"))


def test_lowrank_strategy_reproduces_the_dense_run(tmp_path):
  summaries = {}
  for name in ("sequential+lax", "sequential+lax+lowrank"):
    c = tiny_config()
    c.model.hidden = (256,)  # dense_0 is worth factoring over 3 steps x 4 rows per client
    c.strategy = name
    summaries[name] = train.train_and_evaluate(c, str(tmp_path / name))
  dense, factored = summaries["sequential+lax"], summaries["sequential+lax+lowrank"]
  assert factored["strategy"] == "sequential+lax+lowrank"
  assert factored["test_loss"] == pytest.approx(dense["test_loss"], rel=1e-4)
  assert factored["test_accuracy"] == pytest.approx(dense["test_accuracy"], abs=1e-6)


# ----------------------------------------------------------------------------- text (issue 27)


def test_text_config_tiny_smoke(tmp_path):
  from experiments.configs import fedavg_shakespeare
  c = fedavg_shakespeare.get_config("tiny")
  c.rounds, c.eval_every = 2, 1
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    lines = [json.loads(l) for l in f]
  assert [l["round"] for l in lines] == [1, 2]
  # LEAF vocabulary (81) x 8 embedding, one LSTM layer of 16 (4 gates), the head.
  lstm = 81 * 8 + (8 * 64 + 16 * 64 + 64) + (16 * 81 + 81)
  assert summary["params"] == lstm and all(l["params"] == lstm for l in lines)
  num_test = 8 * 8  # 8 clients x 8 test windows: accuracy is a count over them
  for l in lines:
    assert abs(l["test_accuracy"] * num_test - round(l["test_accuracy"] * num_test)) < 1e-4
  assert lines[1]["train_loss"] < lines[0]["train_loss"]


def test_text_model_and_data_must_fit(tmp_path):
  from experiments.configs import fedavg_shakespeare
  c = tiny_config()
  c.model.name = "shakespeare_lstm"  # a next-token model on images
  with pytest.raises(build.ConfigError, match="model.name='shakespeare_lstm' and "
                     "config.data.name='synthetic' do not fit"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  c = fedavg_shakespeare.get_config("tiny,transformer")
  c.model.num_heads = 3  # d_model 16
  with pytest.raises(build.ConfigError, match="model.num_heads=3 is invalid: allowed a divisor"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_real_shakespeare_loads_with_the_caps():
  import jax
  from experiments.configs import fedavg_shakespeare
  from fedjax_prune import models as models_lib
  c = fedavg_shakespeare.get_config()
  if not os.path.isdir(c.data.data_dir):
    pytest.skip("no ../shared/data/shakespeare here")
  c.data.max_windows_per_client, c.data.max_test_windows_per_client = 4, 2
  with pytest.warns(UserWarning, match="dropping 72 client"):  # shorter than one window
    data = build.build_data(c)
  assert data.train.x.shape == (643, 4, 80) and data.input_shape == (80,) and data.num_classes == 81
  assert data.test_clients.x.shape[1] == 2 and data.test_x.dtype == jax.numpy.uint8
  assert int(data.train.x.max()) < 81 and int(data.train.y.max()) < 81
  spec = build.build_spec(c, data.input_shape, data.num_classes)
  assert spec == models_lib.leaf_shakespeare_lstm()  # LEAF's 2 x 256 LSTM on its vocabulary


def _text_method_run(tmp_path, arg):
  """2 rounds of fedavg_shakespeare.py:`arg` (tiny), evaluated after each; (config, records,
  summary)."""
  from experiments.configs import fedavg_shakespeare
  c = fedavg_shakespeare.get_config(arg)
  c.rounds, c.eval_every = 2, 1
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert [r["round"] for r in records] == [1, 2]
  return c, records, summary


@pytest.mark.parametrize("method", [
    "heterofl", pytest.param("fedrolex", marks=pytest.mark.slow),
    pytest.param("fiarse", marks=pytest.mark.slow)])
def test_text_config_hetero_methods(tmp_path, method):
  """The width methods / FIARSE on the tiny transformer: each level's global accuracy counts
  over the pooled test set, `global` is their mean, and the levels' submodels shrink."""
  import numpy as np
  from tests._checks import assert_counted_accuracy
  c, _, summary = _text_method_run(tmp_path, f"tiny,{method}")
  assert c.model.name == "shakespeare_transformer" and c.method == method
  labels = ("1", "1/4", "1/16")
  for label in labels:
    assert_counted_accuracy(summary[f"global_{label}"], c)
  np.testing.assert_allclose(summary["global"], np.mean([summary[f"global_{l}"] for l in labels]))
  params = summary["level_params"]
  assert params[0] == summary["params"] and params[0] > params[1] > params[2] > 0, params


@pytest.mark.slow  # ~11 s on 2 busy cores; heterofl above is the default-suite text driver run
def test_text_config_fedtiny(tmp_path):
  """FedTiny on the tiny LSTM at density 0.2: the global density is 0.2 of all parameters
  (the embedding table counted, kept dense) and the accuracy counts over the test set."""
  from tests._checks import assert_counted_accuracy
  c, records, summary = _text_method_run(tmp_path, "tiny,fedtiny")
  assert c.model.name == "shakespeare_lstm" and c.sparse.density == 0.2
  for r in records:
    assert r["density"] == pytest.approx(0.2, abs=2e-3)
  assert_counted_accuracy(summary["test_accuracy"], c)


def test_text_config_refuses_scalefl_and_synflow(tmp_path):
  from experiments.configs import fedavg_shakespeare
  c = fedavg_shakespeare.get_config("tiny,heterofl")
  c.method = "scalefl"
  with pytest.raises(build.ConfigError, match="model.name='shakespeare_transformer' is invalid "
                     "for scalefl"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  c = fedavg_shakespeare.get_config("tiny,fedtiny")
  c.method, c.sparse.method = "sparse", "synflow"
  with pytest.raises(build.ConfigError, match="sparse.method='synflow' is invalid with "
                     "model.name='shakespeare_lstm'"):
    train.train_and_evaluate(c, str(tmp_path / "b"))
  with pytest.raises(ValueError, match="more than one method"):
    fedavg_shakespeare.get_config("tiny,fedtiny,heterofl")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_one_shot_magnitude_masks_keep_text_embeddings_dense():
  """Global magnitude pruning on the LSTM prunes its kernels only: the embedding table (a
  lookup) stays dense, and the kernels keep the density fraction of their entries."""
  import jax
  import numpy as np
  from fedjax_prune import models
  from fedjax_prune.pruning import _sparse, one_shot
  spec = models.leaf_shakespeare_lstm(hidden=(6,), embed_dim=3, vocab_size=7, seq_len=4)
  params, _ = models.init_params(spec, jax.random.key(0))
  masks = one_shot.global_magnitude_masks(params, 0.5)
  assert np.asarray(masks["embed"]["embedding"]).all()
  kernels = ["head/kernel", "lstm_0/kernel", "lstm_0/recurrent_kernel"]
  assert one_shot.prunable_layers(params) == tuple(kernels)
  flat = dict(zip(_sparse.leaf_paths(params), jax.tree.leaves(masks)))
  total = sum(np.size(flat[k]) for k in kernels)
  assert total == 258 and sum(int(np.sum(flat[k])) for k in kernels) == 129
  # The largest magnitudes: every kept kernel entry >= every pruned one.
  kept = np.concatenate([np.abs(np.asarray(flat_p))[np.asarray(flat[k])].ravel()
                         for k, flat_p in ((k, _leaf(params, k)) for k in kernels)])
  pruned = np.concatenate([np.abs(np.asarray(flat_p))[~np.asarray(flat[k])].ravel()
                           for k, flat_p in ((k, _leaf(params, k)) for k in kernels)])
  assert kept.min() >= pruned.max()


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _centred_apply(params, stats, x, train=False, example_mask=None):
  """A static-BN-like model: the batch's (masked) mean is subtracted, so logits depend on
  which rows share a batch."""
  import jax.numpy as jnp
  w = example_mask.astype(x.dtype)[:, None]
  mean = jnp.sum(x * w, 0, keepdims=True) / jnp.maximum(jnp.sum(w), 1.0)
  return (x - mean) @ params, stats


@pytest.mark.parametrize("norm", ["none", "batch_static"])
def test_evaluator_reports_the_central_and_per_client_accuracy(norm):
  """`runtime.make_evaluator` evaluates the pooled test set once and splits the hits by
  client: the same numbers as evaluating each client's own (padded) set. With static BN
  (batch statistics at evaluation) it evaluates each client's own batches."""
  import jax
  import ml_collections
  import numpy as np
  from experiments import runtime
  from fedjax_prune import data as data_lib
  from fedjax_prune import federated

  rng = np.random.default_rng(0)
  counts = (7, 1, 12, 0, 4)  # unequal, one client without test data
  xs = [rng.normal(size=(n, 5)).astype(np.float32) + k for k, n in enumerate(counts)]
  ys = [rng.integers(0, 3, n).astype(np.int32) for n in counts]
  test = data_lib.from_client_lists(xs, ys, allow_empty=True)
  test_x, test_y, ids = build.central_test(test)
  np.testing.assert_array_equal(ids, np.repeat(np.arange(5), counts))
  np.testing.assert_array_equal(test_x[7:8], xs[1])  # row 7 is client 1's only example
  data = build.Data(None, data_lib.to_device(test), test_x, test_y, ids, 3, (5,),
                    lambda x: x, "hand-made")
  config = ml_collections.ConfigDict({"eval_batch_size": 8, "model": {"norm": norm}})
  env = runtime.Env(config=config, workdir="", data=data, mesh=None, cohort_multiple=1,
                    metrics=None, checkpoint=runtime.NoCheckpoints(), log=lambda message: None)
  if norm == "none":
    apply_fn = lambda params, stats, x, train=False, example_mask=None: (x @ params, stats)
  else:
    apply_fn = _centred_apply
  params = jax.random.normal(jax.random.key(1), (5, 3))
  got = runtime.make_evaluator(env, apply_fn)(params, {})

  central = jax.jit(federated.make_evaluate(apply_fn, batch_size=8))(params, {}, test_x, test_y).means()
  local = federated.make_evaluate_clients(apply_fn, batch_size=8)(params, {}, data.test_clients)
  n, hits = np.asarray(local.num_examples), np.asarray(local.correct_sum)
  acc = hits[n > 0] / n[n > 0]
  assert got["test_accuracy"] == float(central["accuracy"]) and got["test_loss"] == float(central["loss"])
  assert got["local_accuracy_mean"] == float(acc.mean())
  assert got["local_accuracy_p10"] == float(np.percentile(acc, 10))
  assert len(set(acc.tolist())) > 1  # the clients differ: a mix-up of clients would show
