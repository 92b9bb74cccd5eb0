"""Per-capacity-group execution of the width methods (`GroupedExecution`): each level trains its
sliced model; the round's new global params equal the masked full-size strategy's."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import accounting, data as data_lib, federated, models, testing
from fedjax_prune.pruning import _width_submodels, fedrolex, heterofl, scalefl

CAPS = (1.0, 1 / 4, 1 / 16)           # widths 1, 1/2, 1/4
MLP_KEYS = dict(input_keys=r"^dense_0$", output_keys=r"^dense_1$")
LEAF_KEYS = dict(input_keys=r"^conv_0$", output_keys=r"^dense_1$", flatten_keys=r"^dense_0$")


def _mlp():
  # hidden 16 -> level widths 16 / 8 / 4; batch 5, 6 features, 3 classes: no size collides
  return models.mlp(input_shape=(6,), hidden=(16,), num_classes=3)


def _grouped(spec):
  return heterofl.GroupedExecution(spec, lambda s: models.make_apply(s))


def _rounds(method, params, data, cohort, execution, round_idx, num_rounds=2):
  state = method.algorithm.init(params, jax.random.key(1))
  state = state._replace(round_idx=jnp.asarray(round_idx, jnp.int32))
  round_fn = federated.make_round(method.algorithm, execution=execution)
  for t in range(num_rounds):
    state, metrics = round_fn(state, data, cohort, jax.random.key(10 + t))
  return state, metrics


@pytest.mark.parametrize("factory,round_idx,execution", [
    (heterofl.heterofl, 0, federated.Sequential()),
    (fedrolex.fedrolex, 14, federated.Sequential()),   # windows wrap past unit 16
    pytest.param(fedrolex.fedrolex, 14, federated.Vmap(),  # the switch becomes a select: same result
                 marks=pytest.mark.slow),
], ids=["heterofl", "fedrolex", "fedrolex-vmap"])
def test_grouped_round_equals_masked_round(key, factory, round_idx, execution):
  """Two rounds, momentum SGD, scaler on: the same new global params and metrics. The cohort
  leaves level 1/4 without a client and is padded with an inactive client (multiple=4)."""
  spec = _mlp()
  params, _ = models.init_params(spec, key)
  data = testing.tiny_client_data(num_clients=5, sizes=(5, 9, 3, 7, 6))
  cohort = federated.make_cohort([0, 2, 3], capacity=[1 / 16, 1.0, 1 / 16], multiple=4)
  assert not cohort.active[-1]
  out = {}
  for name, grouped in (("masked", None), ("grouped", _grouped(spec))):
    method = factory(models.make_apply(spec), optax.sgd(0.3, momentum=0.9),
                     federated.LocalSchedule(batch_size=5, num_steps=3), capacities=CAPS,
                     grouped=grouped, **MLP_KEYS)
    out[name] = _rounds(method, params, data, cohort, execution, round_idx)
  (masked, m_metrics), (grouped, g_metrics) = out["masked"], out["grouped"]
  testing.assert_trees_close(grouped.params, masked.params, rtol=1e-5, atol=1e-6)
  for k in ("train_loss", "train_accuracy", "coverage", "update_norm"):
    np.testing.assert_allclose(float(g_metrics[k]), float(m_metrics[k]), rtol=1e-5, err_msg=k)
  # The rounds did train (equal params would also hold if nothing moved).
  moved = np.abs(np.asarray(grouped.params["dense_0"]["kernel"]) - np.asarray(params["dense_0"]["kernel"]))
  assert moved.max() > 1e-2


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (cond branches, scans, pjits) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns(sub.jaxpr)
        elif hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _switch_branches(jaxpr):
  """The branch jaxprs of every `cond` (lax.switch) in a closed jaxpr, nested ones included."""
  return [[b.jaxpr for b in eqn.params["branches"]] for eqn in _eqns(jaxpr.jaxpr)
          if eqn.primitive.name == "cond"]


def _dot_dims(jaxpr) -> set:
  return {d for eqn in _eqns(jaxpr) if eqn.primitive.name == "dot_general"
          for v in eqn.invars for d in v.aval.shape}


def test_each_level_program_trains_the_smaller_model(key):
  """The round holds one program per level (a 3-way switch), and level l's matmuls are over
  its k_l = 16, 8, 4 hidden units only; the masked round's are all full width."""
  spec = _mlp()
  params, _ = models.init_params(spec, key)
  data = testing.tiny_client_data(num_clients=3)
  cohort = federated.make_cohort([0, 1, 2], capacity=[1.0, 1 / 4, 1 / 16])
  jaxprs = {}
  for name, grouped in (("masked", None), ("grouped", _grouped(spec))):
    method = heterofl.heterofl(models.make_apply(spec), optax.sgd(0.1),
                               federated.LocalSchedule(batch_size=5, num_steps=1), capacities=CAPS,
                               grouped=grouped, **MLP_KEYS)
    state = method.algorithm.init(params, key)
    round_fn = federated.make_round(method.algorithm, execution=federated.Sequential())
    jaxprs[name] = jax.make_jaxpr(round_fn)(state, data, cohort, jax.random.key(0))
  switches = [b for b in _switch_branches(jaxprs["grouped"]) if len(b) == 3]
  assert len(switches) == 1
  hidden = {16, 8, 4}
  assert [_dot_dims(b) & hidden for b in switches[0]] == [{16}, {8}, {4}]
  assert _dot_dims(jaxprs["masked"].jaxpr) & hidden == {16}


@pytest.mark.parametrize("name,spec,keys", [
    ("leaf_cnn", models.leaf_femnist_cnn(num_classes=5, widths=(8, 16), dense_width=32,
                                         input_shape=(8, 8, 1)), LEAF_KEYS),
    ("resnet", models.cifar_resnet(depth=8, norm="batch_static", width_multiplier=0.5,
                                   input_shape=(8, 8, 3)), {}),
])
def test_level_specs_are_the_masked_submodels(name, spec, keys):
  """Every level's sliced spec has the masked submodel's parameters and FLOPs, and scattering
  a level's gathered all-ones params back gives its ownership masks (FedRolex window at an
  offset that wraps, LEAF CNN's flattened dense_0 included)."""
  params, _ = models.param_shapes(spec)
  ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  widths = _width_submodels.sqrt_widths((1 / 4, 1 / 64))
  level_specs = heterofl.grouped_level_specs(_grouped(spec), widths)
  for ratio, level_spec in zip(widths, level_specs):
    masks = jax.jit(lambda: heterofl.width_masks(params, ratio, **keys))()
    assert accounting.param_count(level_spec) == accounting.param_count(None, masks, params=params)
    assert accounting.flops(level_spec) == accounting.flops(spec, masks), (name, ratio)
    plan = _width_submodels._level_plan(ones, ratio, None, keys.get("input_keys", heterofl.INPUT_KEYS),
                                        keys.get("output_keys", heterofl.OUTPUT_KEYS),
                                        keys.get("flatten_keys", heterofl.NO_KEYS))
    sliced, back, rolled = jax.jit(lambda p, offset: (
        plan.gather(p, offset), plan.scatter(plan.gather(p, offset), p, offset),
        fedrolex.width_masks(params, ratio, offset, **keys)))(ones, jnp.asarray(13, jnp.int32))
    want, _ = models.param_shapes(level_spec)
    assert jax.tree.map(jnp.shape, sliced) == jax.tree.map(lambda s: s.shape, want)
    for b, m in zip(jax.tree.leaves(back), jax.tree.leaves(rolled)):
      np.testing.assert_array_equal(np.asarray(b) != 0, np.broadcast_to(np.asarray(m), b.shape))


def test_scalefl_level_is_the_truncated_early_exit_model(key):
  """A depth-d ScaleFL level trains stages 1..d with exit d as its head; the others are
  neither gathered nor updated."""
  spec = models.cifar_resnet(depth=8, num_classes=3, norm="batch_static", width_multiplier=0.5,
                             input_shape=(8, 8, 3))
  params, _ = models.init_early_exit_params(spec, (1, 2), key)
  g = scalefl.GroupedExecution(spec, lambda s, e: models.make_early_exit_apply(s, e))
  level_specs = heterofl.grouped_level_specs(g, (1.0, 0.5), (3, 2))
  assert [len(s.stage_widths) for s in level_specs] == [3, 2]
  assert level_specs[1].stage_widths == (4, 8)
  plan = _width_submodels._level_plan(params, 0.5, 2, heterofl.INPUT_KEYS, heterofl.OUTPUT_KEYS,
                                      heterofl.NO_KEYS)
  sliced = plan.gather(params, 0)
  assert sorted(sliced) == ["exit1", "head", "stage1_block0", "stage2_block0", "stem"]
  np.testing.assert_array_equal(sliced["head"]["kernel"], params["exit2"]["kernel"][:8])
  method = scalefl.scalefl(models.make_early_exit_apply(spec, (1, 2)), optax.sgd(0.1),
                           federated.LocalSchedule(batch_size=4), capacities=(1.0, 0.25),
                           widths=(1.0, 0.5), depths=(3, 2), num_exits=3, grouped=g)
  method.algorithm.init(params, key)  # checks every level's sliced params fit its model


@pytest.mark.slow
@pytest.mark.parametrize("method_name", ["fedrolex", "scalefl", "heterofl_leaf_cnn"])
def test_grouped_round_equals_masked_round_conv(key, method_name):
  """As `test_grouped_round_equals_masked_round`, on convolutional models: FedRolex on a
  static-BN ResNet, ScaleFL's width + depth levels (distillation loss, exits), HeteroFL on
  the LEAF CNN (flattened dense input). ~20-40 s each on 2 cores."""
  rng = np.random.default_rng(0)
  if method_name == "heterofl_leaf_cnn":
    spec = models.leaf_femnist_cnn(num_classes=3, widths=(4, 8), dense_width=16,
                                   input_shape=(8, 8, 1))
  else:
    spec = models.cifar_resnet(depth=8, num_classes=3, norm="batch_static", width_multiplier=0.5,
                               input_shape=(8, 8, 3))
  xs = [rng.normal(size=(n,) + spec.input_shape).astype(np.float32) for n in (5, 9, 3, 7, 6)]
  ys = [rng.integers(0, 3, len(x)).astype(np.int32) for x in xs]
  data = data_lib.to_device(data_lib.from_client_lists(xs, ys))
  cohort = federated.make_cohort([0, 2, 3], capacity=[1 / 16, 1.0, 1 / 16], multiple=4)
  schedule = federated.LocalSchedule(batch_size=4, num_steps=2)
  out = []
  for grouped in (False, True):
    if method_name == "scalefl":
      params, _ = models.init_early_exit_params(spec, (1, 2), key)
      widths, depths = scalefl.scalefl_levels(params, CAPS)
      g = scalefl.GroupedExecution(spec, lambda s, e: models.make_early_exit_apply(s, e))
      method = scalefl.scalefl(models.make_early_exit_apply(spec, (1, 2)),
                               optax.sgd(0.1, momentum=0.9), schedule, capacities=CAPS,
                               widths=widths, depths=depths, num_exits=3,
                               grouped=g if grouped else None)
    else:
      params, _ = models.init_params(spec, key)
      factory = fedrolex.fedrolex if method_name == "fedrolex" else heterofl.heterofl
      keys = LEAF_KEYS if method_name == "heterofl_leaf_cnn" else {}
      method = factory(models.make_apply(spec), optax.sgd(0.1, momentum=0.9), schedule,
                       capacities=CAPS, grouped=_grouped(spec) if grouped else None, **keys)
    out.append(_rounds(method, params, data, cohort, federated.Sequential(), round_idx=3)[0])
  testing.assert_trees_close(out[1].params, out[0].params, rtol=1e-4, atol=1e-6)


def test_grouped_execution_rejects_what_it_cannot_slice(key):
  spec = models.resnet18(width_multiplier=1 / 16, norm="batch_running", input_shape=(8, 8, 3))
  params, stats = models.init_params(spec, key)
  method = heterofl.heterofl(models.make_apply(spec), optax.sgd(0.1),
                             federated.LocalSchedule(batch_size=4), capacities=CAPS,
                             grouped=_grouped(spec))
  with pytest.raises(ValueError, match="static BatchNorm"):
    method.algorithm.init(params, key, stats)
  text = models.shakespeare_transformer(num_layers=1, d_model=16, num_heads=4)
  with pytest.raises(ValueError, match="text models run masked"):
    heterofl.heterofl(models.make_apply(text), optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
                      capacities=CAPS, spec=text, grouped=_grouped(text))
  with pytest.raises(TypeError, match="GroupedExecution"):
    heterofl.heterofl(models.make_apply(_mlp()), optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
                      capacities=CAPS, grouped="grouped", **MLP_KEYS)
  # A spec whose widths are not the params' (another model) is named at init.
  method = heterofl.heterofl(models.make_apply(_mlp()), optax.sgd(0.1),
                             federated.LocalSchedule(batch_size=4), capacities=CAPS,
                             grouped=_grouped(models.mlp(input_shape=(6,), hidden=(12,), num_classes=3)),
                             **MLP_KEYS)
  with pytest.raises(ValueError, match="sliced params do not fit"):
    method.algorithm.init(models.init_params(_mlp(), key)[0], key)


def _driver_config(method, execution):
  from experiments.configs import fiarse_cifar10
  c = fiarse_cifar10.base_config(method)
  c.data = dict(name="synthetic", num_clients=6, num_classes=10, examples_per_client=(6, 10),
                test_examples_per_client=4, label_skew_alpha=0.5, data_dir="")
  c.model.width_multiplier = 1 / 16
  c.client.batch_size, c.client.num_steps = 4, 2
  c.hetero.capacities = (1.0, 0.25)
  c.hetero.sweep, c.hetero.augment, c.hetero.repartition = (), False, ""
  c.hetero.submodel_execution = execution
  c.rounds, c.clients_per_round, c.eval_every, c.eval_batch_size = 2, 3, 2, 8
  c.strategy, c.shard_clients, c.progress = "sequential+tapgrad", False, False
  return c


def test_driver_rejects_grouped_where_it_cannot_run(tmp_path):
  from experiments import build, train
  cases = [("fiarse", {}, "invalid for fiarse"),
           ("heterofl", {"strategy": "vmap+lax"}, "named sequential strategy"),
           ("heterofl", {"strategy": "auto"}, "named sequential strategy"),
           ("heterofl", {"model.norm": "batch_running"}, "model.norm"),
           ("heterofl", {"hetero.submodel_execution": "sliced"}, "hetero.submodel_execution")]
  for i, (method, overrides, message) in enumerate(cases):
    c = _driver_config(method, "grouped")
    for path, value in overrides.items():
      node = c
      for part in path.split(".")[:-1]:
        node = node[part]
      node[path.split(".")[-1]] = value
    with pytest.raises(build.ConfigError, match=message):
      train.train_and_evaluate(c, str(tmp_path / str(i)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["heterofl", "scalefl"])
def test_driver_grouped_run_equals_masked_run(tmp_path, method):
  """hetero.submodel_execution='grouped' through experiments/: the same training as the default
  'masked' (ResNet-18 1/16, static BN, synthetic data). Round 1 agrees to float rounding; later
  rounds drift a little further (static BN over 4 examples x 1 pixel at stage 4 amplifies
  rounding), so round 2 is compared at 1e-3."""
  import json
  import os
  from experiments import train
  records = {}
  for e in ("masked", "grouped"):
    train.train_and_evaluate(_driver_config(method, e), str(tmp_path / e))
    with open(os.path.join(tmp_path, e, "metrics.jsonl")) as f:
      records[e] = [json.loads(line) for line in f]
  masked, grouped = records["masked"], records["grouped"]
  for k in ("train_loss", "update_norm", "coverage"):
    np.testing.assert_allclose(grouped[0][k], masked[0][k], rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(grouped[1]["train_loss"], masked[1]["train_loss"], rtol=1e-3)
