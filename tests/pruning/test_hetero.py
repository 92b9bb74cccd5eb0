"""HeteroFL / FedRolex / ScaleFL: index sets, masks vs sliced models, ownership averaging, driver."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import federated, models, testing
from fedjax_prune.pruning import fedrolex, heterofl, scalefl
from tests._checks import assert_counted_accuracy


def _kept(size, ratio, offset=0):
  return sorted(np.flatnonzero(np.asarray(fedrolex.channel_keep(size, ratio, offset))).tolist())


def test_heterofl_prefix_index_sets():
  assert _kept(6, 0.4) == [0, 1, 2]            # ceil(0.4 * 6) = 3
  assert _kept(64, 1 / 8) == list(range(8))
  assert _kept(10, 1.0) == list(range(10))
  assert _kept(3, 0.01) == [0]                 # at least one channel


def test_fedrolex_rolling_index_sets():
  # Round t keeps {(t + j) mod C : j < ceil(r C)}.
  assert _kept(8, 0.5, offset=0) == [0, 1, 2, 3]
  assert _kept(8, 0.5, offset=3) == [3, 4, 5, 6]
  assert _kept(8, 0.5, offset=6) == [0, 1, 6, 7]   # wraps around
  assert _kept(8, 0.5, offset=8 + 6) == [0, 1, 6, 7]
  assert _kept(5, 0.4, offset=4) == [0, 4]
  # Over C rounds every channel is trained equally often.
  counts = sum(np.asarray(fedrolex.channel_keep(8, 0.25, t)).astype(int) for t in range(8))
  np.testing.assert_array_equal(counts, np.full(8, 2))


def _tiny_resnet(width=1 / 8):
  return models.resnet18(width_multiplier=width, norm="batch_static", input_shape=(8, 8, 3))


def test_width_masks_on_resnet_shapes():
  params, _ = models.param_shapes(_tiny_resnet())   # widths 8/16/32/64, abstract
  m = heterofl.width_masks(params, 0.5)
  stem = np.asarray(m["stem"]["conv"]["kernel"])
  assert stem.shape == (1, 1, 3, 8)
  assert stem[0, 0, :, :4].all() and not stem[0, 0, :, 4:].any()   # image channels never sliced
  conv = np.asarray(m["stage2_block0"]["conv1"]["kernel"])           # [3, 3, 8, 16]
  assert conv.shape == (1, 1, 8, 16)
  np.testing.assert_array_equal(conv[0, 0], np.outer(np.arange(8) < 4, np.arange(16) < 8))
  np.testing.assert_array_equal(m["stage2_block0"]["bn1"]["scale"], np.arange(16) < 8)
  head = np.asarray(m["head"]["kernel"])                             # [64, 10]
  np.testing.assert_array_equal(head, np.repeat((np.arange(64) < 32)[:, None], 10, axis=1))
  assert np.asarray(m["head"]["bias"]).all()                         # classes never sliced
  rolled = fedrolex.width_masks(params, 0.5, 6)
  np.testing.assert_array_equal(rolled["stage1_block0"]["bn1"]["scale"],
                                np.isin(np.arange(8), [6, 7, 0, 1]))


def test_masked_full_model_equals_sliced_model(key):
  """The mask strategy's outputs equal the genuinely smaller (width-prefix) model's."""
  big, small = _tiny_resnet(1 / 8), _tiny_resnet(1 / 16)   # widths 8.. vs 4..: r = 1/2
  apply_big, params, _ = models.build(big, key)
  apply_small = models.make_apply(small)
  small_shapes, _ = models.param_shapes(small)
  masks = heterofl.width_masks(params, 0.5)
  masked = jax.tree.map(lambda p, m: jnp.where(m, p, 0.0), params, masks)
  sliced = jax.tree.map(lambda p, s: p[tuple(slice(0, d) for d in s.shape)], params, small_shapes)
  x = jax.random.normal(jax.random.fold_in(key, 1), (4, 8, 8, 3))
  big_out = jax.jit(lambda p: apply_big(p, {}, x, train=False)[0])(masked)
  small_out = jax.jit(lambda p: apply_small(p, {}, x, train=False)[0])(sliced)
  np.testing.assert_allclose(np.asarray(big_out), np.asarray(small_out), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factory,offset", [
    (heterofl.heterofl, 0),
    (fedrolex.fedrolex, 1),                                                   # 'extraction'
    (lambda *a, **k: fedrolex.fedrolex(*a, eval_window="last_round", **k), 0),
])
def test_evaluated_submodel_is_the_trained_forward_pass(key, factory, offset):
  """A width-r submodel evaluates as its clients trained it, the Scaler included (issue 24):
  the scaler used to scale the classifier by 1/r in training only, so the evaluated logits
  were r x the trained signal plus the head bias (8x too influential at r = 1/8)."""
  from fedjax_prune.pruning import _width_submodels
  spec = _tiny_resnet(1 / 8)
  apply_fn, params, stats = models.build(spec, key)
  caps = (1.0, 1 / 4, 1 / 64)
  method = factory(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
                   capacities=caps)
  state = method.algorithm.init(params, key, stats)
  # After round 1: HeteroFL evaluates its prefix (offset 0); FedRolex the window round 2 will
  # train (offset 1, the official extraction) or, as an option, the one round 1 trained (0).
  state = state._replace(round_idx=jnp.asarray(1, jnp.int32))
  # batch-static BN: the same normalisation in train and eval mode
  x = jax.random.normal(jax.random.fold_in(key, 1), (6, 8, 8, 3))
  for cap, ratio in zip(caps, _width_submodels.sqrt_widths(caps)):
    masks = _width_submodels.width_masks(state.params, ratio, offset)
    trained = _width_submodels._submodel_apply(apply_fn, masks, ratio, True, heterofl.OUTPUT_KEYS)
    want = trained(state.params, state.batch_stats, x, train=True)[0]
    sub_params, _ = method.submodel(state, cap)
    got = apply_fn(sub_params, state.batch_stats, x, train=False)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5,
                               err_msg=f"capacity {cap}")


def _tiny_fedrolex(apply_fn, window):
  return fedrolex.fedrolex(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
                           capacities=(1.0, 0.25), eval_window=window, input_keys=r"^dense_0$",
                           output_keys=r"^dense_1$")


def test_fedrolex_evaluation_windows(key):
  """FedRolex's evaluated level-r window: 'extraction' (default) is the window the official
  server's split_model extracts after round t's step (offset t), 'last_round' the one round t
  trained (t - 1), 'prefix' units 0..k-1; width 1 keeps every unit under all three."""
  apply_fn, params, _ = testing.tiny_problem(key)          # hidden width 8; 1/4 -> 4 units
  x = jax.random.normal(jax.random.fold_in(key, 1), (5, 6))
  logits_fn = jax.jit(lambda p: apply_fn(p, {}, x, train=False)[0])
  kept, logits = {}, {}
  for window in fedrolex.EVAL_WINDOWS:
    method = _tiny_fedrolex(apply_fn, window)
    state = method.algorithm.init(params, key)._replace(round_idx=jnp.asarray(3, jnp.int32))
    sub, _ = method.submodel(state, 0.25)
    kept[window] = np.flatnonzero(np.abs(np.asarray(sub["dense_0"]["kernel"])).sum(0)).tolist()
    logits[window] = np.asarray(logits_fn(sub))
    full, _ = method.submodel(state, 1.0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(params)))
  assert kept == {"extraction": [3, 4, 5, 6], "last_round": [2, 3, 4, 5], "prefix": [0, 1, 2, 3]}
  assert np.abs(logits["extraction"] - logits["last_round"]).max() > 1e-3
  with pytest.raises(ValueError, match="eval_window must be one of"):
    _tiny_fedrolex(apply_fn, "all")


def test_flattened_input_masks_follow_the_last_conv_channels():
  """LEAF CNN: dense_0 reads the flattened [7, 7, 64] map; a width-r level keeps, at every
  position, the channels conv_1 keeps (flattening puts the channel fastest)."""
  params, _ = models.param_shapes(models.leaf_femnist_cnn(num_classes=62))
  m = heterofl.width_masks(params, 0.5, 2, input_keys=r"^conv_0$", output_keys=r"^dense_1$",
                           flatten_keys=r"^dense_0$")
  conv_keep = np.asarray(m["conv_1"]["bias"])
  np.testing.assert_array_equal(conv_keep, np.isin(np.arange(64), np.arange(2, 34)))
  d0 = np.asarray(m["dense_0"]["kernel"])                    # [3136, 2048]
  np.testing.assert_array_equal(d0[:, 2], np.tile(conv_keep, 49))   # hidden unit 2 is kept
  assert not d0[:, 0].any()                                          # hidden unit 0 is not
  np.testing.assert_array_equal(d0[2], np.isin(np.arange(2048), np.arange(2, 1026)))
  assert np.asarray(m["conv_0"]["kernel"])[0, 0, 0, :].sum() == 16   # image channel kept
  assert np.asarray(m["dense_1"]["bias"]).all()                      # classes never sliced
  with pytest.raises(ValueError, match="not a multiple of the last conv"):
    heterofl.width_masks(params, 0.5, flatten_keys=r"^conv_1$")   # 32 inputs, 64 channels


def test_ownership_partial_averaging_round(key):
  """Each coordinate moves by the mean update of the clients holding it; others stay put."""
  apply_fn, params, data = testing.tiny_problem(key)   # dense_0 [6, 8], dense_1 [8, 3]
  caps = (1.0, 0.25)                                   # widths 1 and 1/2
  method = heterofl.heterofl(apply_fn, optax.sgd(0.3), federated.LocalSchedule(batch_size=4, num_steps=2),
                             capacities=caps, scaler=False, input_keys=r"^dense_0$",
                             output_keys=r"^dense_1$")
  state = method.algorithm.init(params, jax.random.key(1))
  cohort = federated.make_cohort([0, 1, 2], capacity=[0.25, 0.25, 0.25])
  new, metrics = federated.make_round(method.algorithm, execution=federated.Vmap())(
      state, data, cohort, jax.random.key(3))
  moved = np.asarray(new.params["dense_0"]["kernel"]) != np.asarray(params["dense_0"]["kernel"])
  assert not moved[:, 4:].any()            # hidden units 4..7 belong to no width-1/2 client
  assert moved[:, :4].any()
  assert not (np.asarray(new.params["dense_1"]["kernel"])[4:] != np.asarray(params["dense_1"]["kernel"])[4:]).any()
  np.testing.assert_allclose(float(metrics["coverage"]), (6 * 4 + 4 + 4 * 3 + 3) / (6 * 8 + 8 + 8 * 3 + 3))


def test_fedrolex_window_moves_with_the_round(key):
  apply_fn, params, data = testing.tiny_problem(key)
  method = fedrolex.fedrolex(apply_fn, optax.sgd(0.3), federated.LocalSchedule(batch_size=4, num_steps=1),
                             capacities=(1.0, 0.25), scaler=False, input_keys=r"^dense_0$",
                             output_keys=r"^dense_1$")
  round_fn = federated.make_round(method.algorithm, execution=federated.Vmap())
  state = method.algorithm.init(params, jax.random.key(1))
  cohort = federated.make_cohort([0, 1, 2], capacity=[0.25] * 3)
  for t in range(3):
    before = np.asarray(state.params["dense_0"]["bias"])
    state, _ = round_fn(state, data, cohort, jax.random.key(t))
    moved = np.flatnonzero(np.asarray(state.params["dense_0"]["bias"]) != before).tolist()
    assert set(moved) <= {(t + j) % 8 for j in range(4)}, (t, moved)


def test_scalefl_depth_masks_and_levels(key):
  spec = _tiny_resnet()
  params, _ = models.init_early_exit_params(spec, (1, 2, 3), key)
  stages = scalefl.leaf_stages(params)
  assert stages["stem"]["conv"]["kernel"] == 0 and stages["exit2"]["kernel"] == 2
  assert stages["stage3_block1"]["conv2"]["kernel"] == 3 and stages["head"]["kernel"] == 4
  dm = scalefl.depth_masks(params, 2)
  assert bool(dm["stage2_block1"]["bn1"]["scale"]) and not bool(dm["stage3_block0"]["conv1"]["kernel"])
  assert not bool(dm["head"]["bias"])
  fractions = scalefl.stage_param_fractions(params)
  assert len(fractions) == 4 and all(a < b for a, b in zip(fractions, fractions[1:]))
  np.testing.assert_allclose(fractions[-1], 1.0)
  widths, depths = scalefl.scalefl_levels(params, (1.0, 1 / 4, 1 / 16, 1 / 64))
  assert widths[0] == 1.0 and depths[0] == 4
  for w, d, c in zip(widths, depths, (1.0, 1 / 4, 1 / 16, 1 / 64)):
    assert 0 < w <= 1 and 2 <= d <= 4
    np.testing.assert_allclose(w * w * fractions[d - 1], c, rtol=0.15)  # ~ capacity of the params
  with pytest.raises(ValueError, match="exit_stages must be increasing"):
    models.init_early_exit_params(spec, (4,), key)


def test_self_distillation_loss_hand_computed():
  logits = jnp.asarray([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])   # B=1, X=3, K=2
  y = jnp.asarray([0])
  ce = lambda z: float(-jax.nn.log_softmax(jnp.asarray(z))[0])
  # alpha = 0: mean CE over the used exits; exits past the depth are ignored.
  loss = scalefl.self_distillation_loss(2, 3, alpha=0.0)(logits, y)
  np.testing.assert_allclose(float(loss[0]), (ce([2.0, 0.0]) + ce([0.0, 1.0])) / 2, rtol=1e-6)
  # alpha = 1, T = 1: exit 0 gets KL(teacher exit 1 || exit 0), exit 1 its CE.
  t = jax.nn.softmax(jnp.asarray([0.0, 1.0]))
  kl = float(jnp.sum(t * (jnp.log(t) - jax.nn.log_softmax(jnp.asarray([2.0, 0.0])))))
  loss = scalefl.self_distillation_loss(2, 3, alpha=1.0, temperature=1.0)(logits, y)
  np.testing.assert_allclose(float(loss[0]), (kl + ce([0.0, 1.0])) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    scalefl.self_distillation_loss(2, 3, temperature=0.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(widths=(1.0,)), "widths must give one ratio"),
    (dict(widths=(1.0, 0.0)), "widths must give one ratio in \\(0, 1\\]"),
    (dict(capacities=(1.0, 2.0)), "capacities must lie in"),
])
def test_bad_width_arguments_are_named(kwargs, message):
  args = dict(capacities=(1.0, 0.25))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    heterofl.heterofl(lambda *a, **k: None, optax.sgd(0.1), federated.LocalSchedule(batch_size=2), **args)


# ----------------------------------------------------------------------------- driver


def _tiny_driver_config(method):
  from experiments.configs import fiarse_cifar10
  c = fiarse_cifar10.base_config(method)
  c.data = dict(name="synthetic", num_clients=4, num_classes=3, examples_per_client=(6, 8),
                test_examples_per_client=4, label_skew_alpha=0.5, data_dir="")
  c.model.name = "mlp"
  c.model.hidden = (8,)
  c.model.norm = "none"
  c.client.batch_size = 4
  c.client.num_steps = 2
  c.hetero.capacities = (1.0, 0.25)
  c.hetero.sweep = (1.0, 1 / 256)
  c.hetero.augment = False
  c.hetero.repartition = ""
  c.rounds = 2
  c.clients_per_round = 3
  c.eval_every = 1
  c.eval_batch_size = 4
  c.strategy = "vmap+lax"
  c.progress = False
  return c


def test_driver_smoke_fiarse(tmp_path):
  from experiments import train
  workdir = str(tmp_path / "run")
  config = _tiny_driver_config("fiarse")
  summary = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["round"] for r in records] == [1, 2]
  # Global metrics count over the pooled test set; the full-size sweep entry is global_1.
  for key_ in ("global_1", "global_1/4", "sweep_1", "sweep_1/256"):
    assert_counted_accuracy(summary[key_], config)
  assert summary["sweep_1"] == summary["global_1"]
  np.testing.assert_allclose(summary["global"], (summary["global_1"] + summary["global_1/4"]) / 2)
  # 4 clients with 4 local test examples, interleaved over 2 levels: each level's Model metric
  # is the mean of two k/4 accuracies, and Local the mean over all four.
  for key_ in ("model_1", "model_1/4"):
    assert summary[key_] * 8 == pytest.approx(round(summary[key_] * 8)), key_
  np.testing.assert_allclose(summary["local"], (summary["model_1"] + summary["model_1/4"]) / 2)


def test_driver_rejects_bad_hetero_fields(tmp_path):
  from experiments import build, train
  c = _tiny_driver_config("fiarse")
  c.hetero.capacities = (1.0, 1.5)
  with pytest.raises(build.ConfigError, match="hetero.capacities"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  c = _tiny_driver_config("heterofl")
  with pytest.raises(build.ConfigError, match="model.name='mlp' is invalid"):
    train.train_and_evaluate(c, str(tmp_path / "b"))
  c = _tiny_driver_config("fiarse")
  c.hetero.fiarse_grad = "ste"
  with pytest.raises(build.ConfigError, match="hetero.fiarse_grad"):
    train.train_and_evaluate(c, str(tmp_path / "c"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["heterofl", "fedrolex", "scalefl"])
def test_driver_smoke_width_methods(tmp_path, shared_data_dir, method):
  from experiments import train
  c = _tiny_driver_config(method)
  c.data = dict(name="cifar10_pfllib",
                data_dir=os.path.join(shared_data_dir, "cifar10", "fedlore_pfllib_dir0.3_100clients"))
  c.model.name = "resnet18"
  c.model.norm = "batch_static"
  c.model.width_multiplier = 1 / 16
  c.rounds = 1
  c.clients_per_round = 2
  c.client.num_steps = 1
  c.eval_batch_size = 100
  c.hetero.sweep = ()
  c.strategy = "sequential+tapgrad"
  summary = train.train_and_evaluate(c, str(tmp_path / method))
  for key_ in ("global_1", "global_1/4"):
    assert_counted_accuracy(summary[key_], c)
  np.testing.assert_allclose(summary["global"], (summary["global_1"] + summary["global_1/4"]) / 2)
  assert summary["model_1/4"] == summary["model_1/4"]  # not nan: every level has clients


def test_fedrolex_method_evaluates_alternative_windows_on_the_same_state(key):
  """`alternatives` evaluates other windows of the same trained state: an alternative with the
  default window reproduces every metric, 'last_round' differs below width 1 only."""
  from fedjax_prune.pruning import _hetero
  apply_fn, params, data = testing.tiny_problem(key)
  x, y = data.x.reshape(-1, 6), data.y.reshape(-1)
  caps = (1.0, 0.25)
  method = fedrolex.fedrolex_method(
      _tiny_fedrolex(apply_fn, "extraction"),
      alternatives={"same": _tiny_fedrolex(apply_fn, "extraction"),
                    "last_round": _tiny_fedrolex(apply_fn, "last_round")},
      spec=models.mlp(input_shape=(6,), hidden=(8,), num_classes=3), params=params, batch_stats={},
      key=key, eval_apply=apply_fn, test=_hetero.LevelTest(x, y, data, 4),
      client_caps=np.asarray([1.0, 0.25, 0.25], np.float32), capacities=caps, num_rounds=10)
  state = method.init()
  state = state._replace(server=state.server._replace(round_idx=jnp.asarray(3, jnp.int32)))
  out = method.evaluator(None)(state, 0)
  for k in ("global_1", "global_1/4", "model_1/4", "local", "global"):
    assert out[f"same_{k}"] == out[k], k
  assert out["last_round_global_1"] == out["global_1"]
  assert "last_round_global_1/4" in out and "same_test_accuracy" not in out


def test_level_evaluation_from_the_pooled_pass_equals_per_client(key):
  """`LevelTest.client_ids` (no static BN): every level's local sums come from the global
  pass; each metric equals evaluating the clients' own sets, the global ones bit for bit."""
  from fedjax_prune import data as data_lib
  from fedjax_prune.pruning import _hetero
  apply_fn, params, data = testing.tiny_problem(key)
  x, y = (jnp.asarray(a) for a in data_lib.pool(data))
  ids = jnp.asarray(np.repeat(np.arange(3), np.asarray(data.num_examples)), jnp.int32)
  caps = (1.0, 0.25)

  def evaluate(test):
    method = fedrolex.fedrolex_method(
        _tiny_fedrolex(apply_fn, "extraction"), spec=models.mlp(input_shape=(6,), hidden=(8,), num_classes=3),
        params=params, batch_stats={}, key=key, eval_apply=apply_fn, test=test,
        client_caps=np.asarray([1.0, 0.25, 0.25], np.float32), capacities=caps, num_rounds=10)
    return method.evaluator(None)(method.init(), 0)

  per_client = evaluate(_hetero.LevelTest(x, y, data, 4))
  pooled = evaluate(_hetero.LevelTest(x, y, data, 4, client_ids=ids))
  assert pooled == per_client
  assert len({per_client["model_1"], per_client["model_1/4"], per_client["global_1/4"]}) > 1
