"""benchmarks/fedtiny_cost_terms.py charges every round exactly as the library's Methods do
(issue 25), on a 1/16-width ResNet-18 at 8x8 inputs and 25 rounds."""
import os
import sys
import types

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "benchmarks"))

import fedtiny_cost_terms as ftc  # noqa: E402
from fedjax_prune import federated, models  # noqa: E402
from fedjax_prune import masks as masks_lib  # noqa: E402
from fedjax_prune.pruning import _sparse, base, feddst, fedtiny, prunefl  # noqa: E402

DENSITY, CLIENTS, EXAMPLES = 0.1, 4, 20


def _setting():
  config = ftc.paper_config("resnet18")
  config.model.width_multiplier = 1 / 16
  config.rounds = 25  # scaled schedule: ΔT 1, T_end 15 (14 adjustments, 4 blocks)
  config.sparse.prunefl_adjust_every = 5  # rounds 5, 10, 15 (<= T_end)
  spec = ftc.spec_of(config, input_shape=(8, 8, 3))
  params, stats = models.init_params(spec, jax.random.key(0))
  return config, spec, params, stats, ftc.setting_of(config, params, EXAMPLES)


def _library_totals(method, s, masks, record_of):
  """Drives the library Method's own `after_round` (its `extra_cost` and accounting)."""
  totals = dict(client_training_flops=0, client_upload_bytes=0, client_download_bytes=0,
                client_peak_memory_bytes=0)
  state = federated.MethodState(types.SimpleNamespace(masks=masks), None,
                                {"cost_totals": totals, "summary": {}},
                                {"masks": masks, "sizes": {}, "cost": None})
  for t in range(s.rounds):
    record = dict(local_steps=float(s.local_steps * CLIENTS), num_clients=float(CLIENTS),
                  **record_of(t))
    state = method.after_round(state, t, record)
  return state.host["cost_totals"]


def test_script_charges_what_the_library_methods_charge():
  config, spec, params, stats, s = _setting()
  costs = ftc.cell_costs(spec, config, DENSITY, "uniform", examples_per_client=EXAMPLES,
                         methods=("dense", "fedtiny", "feddst", "prunefl"))
  ranks = ftc.score_ranks(params)
  masks = ftc.masks_at(params, ranks, ftc.target_counts(params, DENSITY, "uniform"))
  # The script keeps the library's magnitude-mask counts (`masks.topk` of the layer
  # densities; checked on the stem and head, whose densities differ under ERK).
  prunable = _sparse.prunable_filter(params)
  for distribution in ("uniform", "erk"):
    dens = _sparse.layer_densities(params, DENSITY, distribution, prunable)
    counts = ftc.target_counts(params, DENSITY, distribution)
    leaves = dict(zip(_sparse.leaf_paths(params), jax.tree.leaves(params)))
    layer_dens = dict(zip(_sparse.leaf_paths(params), jax.tree.leaves(dens)))
    for path in ("stem/conv/kernel", "head/kernel"):
      lib = masks_lib.topk({"k": leaves[path]}, {"k": layer_dens[path]})["k"]
      assert counts[path] == int(np.sum(lib)), (distribution, path)

  run = base.SparseRun(
      spec=spec, params=params, batch_stats=stats, key=jax.random.key(0),
      optimizer=optax.sgd(0.1), schedule=federated.LocalSchedule(batch_size=64, num_epochs=5),
      model=federated.ModelFns(models.make_apply, lambda apply_fn: None),
      train=types.SimpleNamespace(num_examples=np.full(CLIENTS, EXAMPLES)),
      clients_per_round=CLIENTS, rounds=s.rounds)
  adjusted = lambda t: float(fedtiny.adjustment_round(t, s.adjust_every, s.adjust_end))
  library = {
      "dense": (base.dense_method(run), lambda t: {}),
      "fedtiny": (fedtiny.fedtiny_method(
          run, density=DENSITY, num_candidates=config.sparse.num_candidates,
          abns_cohort=federated.make_cohort(range(CLIENTS)), abns_batch_size=8,
          progressive=fedtiny.Blockwise(s.blocks), adjust_every=s.adjust_every,
          adjust_end=s.adjust_end),
          lambda t: dict(adjusted=adjusted(t), adjusted_block=float(
              ftc.fedtiny_block(s, t) if adjusted(t) else -1))),
      "feddst": (feddst.feddst_method(run, density=DENSITY, adjust_every=s.dst_every,
                                      adjust_end=s.dst_end), lambda t: dict(adjusted=adjusted(t))),
      "prunefl": (prunefl.prunefl_method(run, density=DENSITY, adjust_every=s.prunefl_every,
                                         adjust_end=s.prunefl_end),
                  lambda t: dict(adjusted=float(masks_lib.should_update(
                      t, s.prunefl_every, begin=1, end=s.prunefl_end)))),
  }
  for name, (method, record_of) in library.items():
    totals = _library_totals(method, s, masks, record_of)
    cost = costs[name]
    assert totals["client_training_flops"] / s.rounds == pytest.approx(
        sum(cost.compute.values()), rel=1e-12), name
    assert totals["client_peak_memory_bytes"] == sum(cost.memory.values()), name

  # FedTiny: a dense gradient in exactly its 14 adjustment rounds (0 < t < T_end, t % ΔT == 0),
  # the adaptive BN selection's forward passes in round 0 only.
  n_adjust = fedtiny.num_adjustments(s.adjust_every, s.adjust_end)
  assert (s.adjust_every, s.adjust_end, n_adjust) == (1, 15, 14)
  assert costs["fedtiny"].dense_gradient_rounds == tuple(range(1, 15))
  assert costs["fedtiny"].forward_only_rounds == (0,)
  assert costs["prunefl"].dense_gradient_rounds == (5, 10, 15)
  # Its blocks cycle input -> output: 14 adjustments over 4 blocks = 4, 4, 3, 3.
  blocks = [ftc.fedtiny_block(s, t) for t in costs["fedtiny"].dense_gradient_rounds]
  assert [blocks.count(b) for b in range(4)] == [4, 4, 3, 3] and blocks[:5] == [0, 1, 2, 3, 0]
