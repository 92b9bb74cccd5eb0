"""One library-level contract over every `federated.Method`, driven by `federated.run_rounds`.

Each method is built from its tiny contract config (tests/test_method_contract.py) by its
experiments module's `build(config, env)`; the rounds then run through the library's round
loop alone (no workdir, metrics file or checkpoint). For every method:

  1. the round compiles once per architecture (`compile_round` is called once per spec);
  2. padding the cohort with inactive clients changes nothing (bit for bit under the
     sequential execution; a vectorised sum over more clients may add in another order);
  3. the order of the cohort does not matter (up to float summation order);
  4. another training key gives another model;
  5. masks stay consistent: every state's masks pass `masks.check` against its params,
     and a masked-out parameter is exactly zero;
  6. the algorithm's `init(params, key, batch_stats)` alone gives the method's state shape;
  7. shrunk = masked where the method rebuilds: a rebuild that keeps filters
     (`cache['keep']`: ASP, L1 filter) gives the architecture the equivalent masks count
     (params and FLOPs), and where it inherits the weights the rebuilt model evaluates as
     the old one with those masks applied; a CAVP rebuild removes only dead structures,
     so the gated model evaluates the same before and after it.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from experiments import build, methods, runtime
from experiments.configs import fedavg_shakespeare
from fedjax_prune import accounting, federated, structured
from fedjax_prune import masks as masks_lib
from tests import test_method_contract as contract


def _env(config) -> runtime.Env:
  return runtime.Env(config=config, workdir="", data=build.build_data(config), mesh=None,
                     cohort_multiple=1, metrics=None, checkpoint=runtime.NoCheckpoints(),
                     log=lambda message: None)


# Text models (issue 27): ASP on the tiny LSTM of experiments/configs/fedavg_shakespeare.py
# (synthetic text); its rebuild goes through the generic `structured` entry points.
TEXT_CASES = {"asp/text_lstm": lambda: contract._common(fedavg_shakespeare.get_config("tiny,asp"))}


def _build(name):
  config = TEXT_CASES[name]() if name in TEXT_CASES else contract.CASES_BY_NAME[name].config()
  env = _env(config)
  driver = methods.DRIVERS[config.get("method", "fedavg")]
  driver.validate(config)
  return config, driver.build(config, env)


def _padded(cohort: federated.Cohort, extra: int) -> federated.Cohort:
  ids = np.asarray(cohort.client_ids)
  return federated.Cohort(np.concatenate([ids, np.zeros(extra, ids.dtype)]),
                          np.concatenate([np.asarray(cohort.active), np.zeros(extra, bool)]),
                          np.concatenate([np.asarray(cohort.capacity), np.ones(extra, np.float32)]))


def _permuted(cohort: federated.Cohort) -> federated.Cohort:
  order = np.arange(len(cohort.client_ids))[::-1]
  return federated.Cohort(*(np.asarray(field)[order] for field in cohort))


def _drive(config, run: runtime.Run, compile_round, *, cohort_fn=None, training_seed=None,
           num_rounds=None):
  """The rounds through `federated.run_rounds`; returns (final state, records, specs after
  each round). Checks every state's masks on the way (contract item 5)."""
  state = run.method.init()
  state = state._replace(server=jax.tree.map(jax.numpy.copy, state.server))  # donated
  seed = config.seeds.training if training_seed is None else training_seed
  records, specs = [], []
  for _, state, record in federated.run_rounds(
      run.method, state, train=run.train, cohort_fn=cohort_fn or run.cohort,
      train_root=jax.random.key(seed), init_key=jax.random.key(config.seeds.init),
      rounds=range(num_rounds or config.rounds), compile_round=compile_round):
    records.append(record)
    specs.append(repr(state.spec))
    masks = getattr(state.server, "masks", None)
    if masks is not None:
      masks_lib.check(state.server.params, masks)
      for p, m in zip(jax.tree.leaves(state.server.params), jax.tree.leaves(masks)):
        assert not np.any(np.asarray(p)[~np.broadcast_to(np.asarray(m), np.shape(p))]), \
            "a masked-out parameter is not zero"
  return state, records, specs


def _rebuilds(method: federated.Method):
  """`method` whose host hooks also record every (state before, state after) pair of a hook
  that changed the architecture."""
  seen = []

  def watch(hook):
    def watched(state, *args):
      after = hook(state, *args)
      if repr(after.spec) != repr(state.spec):  # host copies: the next round donates the state
        seen.append(tuple(s._replace(server=jax.device_get(s.server)) for s in (state, after)))
      return after
    return watched

  return method._replace(before_round=watch(method.before_round),
                         after_round=watch(method.after_round)), seen


def _check_shrunk_equals_masked(run: runtime.Run, before, after):
  """Contract item 7 for one rebuild."""
  keep = (after.cache or {}).get("keep") if isinstance(after.cache, dict) else None
  if keep is not None:
    masks = structured.keep_masks(before.spec, keep)
    assert accounting.param_count(after.spec) == accounting.param_count(before.spec, masks)
    assert accounting.flops(after.spec) == accounting.flops(before.spec, masks)
    old = jax.device_get(before.server)
    sliced = structured.shrink(before.spec, old.params, keep, batch_stats=old.batch_stats)
    inherited = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(sliced.params), jax.tree.leaves(jax.device_get(after.server.params))))
    if inherited:  # the rebuilt model is the old one with the removed filters masked
      masked = before._replace(server=old._replace(params=masks_lib.apply(old.params, masks)))
      want = run.method.evaluator(before.spec)(masked, 0)
      got = run.method.evaluator(after.spec)(after, 0)
      np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-4)
      assert got["test_accuracy"] == want["test_accuracy"]
    return "keep" + ("+inherited" if inherited else "")
  # A rebuild without a keep (CAVP's) removes only dead structures: the same function.
  want = run.method.evaluator(before.spec)(before, 0)
  got = run.method.evaluator(after.spec)(after, 0)
  np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-4)
  assert got["test_accuracy"] == want["test_accuracy"]
  return "same function"


def _params(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.server.params))]


# The rebuilds each case's run makes (contract item 7): ASP re-initialises what it keeps, the
# L1 filter inherits it, CAVP removes dead gates; every other method keeps its architecture.
REBUILD_KINDS = {"asp": {"keep"}, "asp/text_lstm": {"keep"}, "l1_filter": {"keep+inherited"},
                 "cavp/centralised": {"same function"}, "cavp/federated": {"same function"}}

# In the default selection: one case per kind of method (one-shot masks, client-side
# masks, capacities, the cheapest dense one); the rest, and every CNN/ResNet case, are slow.
FAST = ("fedavg/fedavgm+prune", "sparse/feddst", "fiarse/masked", "sparse/dense")


@pytest.mark.parametrize("name", contract._params(FAST) + [
    pytest.param(name, marks=pytest.mark.slow) for name in TEXT_CASES])
def test_method_contract(name):
  config, run = _build(name)
  compiled = {}  # one round function per algorithm object: cohorts of new shapes retrace it

  def compile_round(alg):
    if id(alg) not in compiled:
      compiled[id(alg)] = (alg, run.strategy.make_round(alg, donate=True))
    return compiled[id(alg)][1]

  calls = []
  watched, rebuilds = _rebuilds(run.method)
  reference, records, specs = _drive(config, run._replace(method=watched),
                                     lambda alg: calls.append(alg) or compile_round(alg))
  # 7. shrunk = masked at every rebuild (before the other items reuse the run).
  kinds = [_check_shrunk_equals_masked(run, before, after) for before, after in rebuilds]
  assert set(kinds) == REBUILD_KINDS.get(name, set()), kinds
  # 1. at most one compilation per architecture (a phase that keeps the shapes adds none).
  architectures = {repr(run.method.init().spec), *specs}
  assert 1 <= len(calls) <= len(architectures), (len(calls), architectures)
  # 2. padding clients are no-ops: the same model, bit for bit over the whole run when
  # clients run one after another; a vectorised sum over more clients may add in another
  # order, so there after one round (over more rounds a tiny model amplifies the order's
  # rounding, as any two summation orders: l1_filter's vmap round reached 6e-5 relative).
  exact = isinstance(run.strategy.execution, federated.Sequential)
  first, first_records, _ = _drive(config, run, compile_round, num_rounds=1)
  padded, padded_records, _ = _drive(config, run, compile_round, num_rounds=None if exact else 1,
                                     cohort_fn=lambda r: _padded(run.cohort(r), 2))
  for a, b in zip(_params(reference if exact else first), _params(padded)):
    if exact:
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["train_loss"] for r in (records if exact else first_records)],
                             [r["train_loss"] for r in padded_records], rtol=1e-5)
  # 3. cohort order: the same model up to float summation order, after one round.
  permuted, _, _ = _drive(config, run, compile_round, num_rounds=1,
                          cohort_fn=lambda r: _permuted(run.cohort(r)))
  for a, b in zip(_params(first), _params(permuted)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # 4. another training key: another model.
  other, _, _ = _drive(config, run, compile_round, training_seed=config.seeds.training + 1)
  assert any(not np.array_equal(a, b) for a, b in zip(_params(reference), _params(other)))
  # 6. one init shape: the algorithm's init(params, key, batch_stats) alone builds a server
  # state of the structure and shapes the method starts from.
  start = run.method.init()
  server = start.server
  again = run.method.algorithm(start.spec).init(server.params, jax.random.key(0), server.batch_stats)
  assert jax.tree.structure(again) == jax.tree.structure(server)
  assert [np.shape(x) for x in jax.tree.leaves(again)] == [np.shape(x) for x in
                                                          jax.tree.leaves(server)]
