"""FIARSE vs HeteroFL, FedRolex, ScaleFL and dense FedAvg on real CIFAR-10, sized to converge on CPU.

Command (resumable; re-run it to continue, finished runs are skipped):
  python -m experiments.sweep --config experiments/configs/fiarse_cifar10_converged.py \
      --workdir workdir/fiarse_cifar10_converged
  (the 1 ... 1/256 size sweep every 50 rounds, for curves: `...converged.py:sizes`)

Data (§4.8): the 20 clients of ../shared/data/cifar10/fedlore_pfllib_dir0.3_100clients pooled
(8,265 train / 2,767 test images) and re-partitioned with FIARSE's balanced Dirichlet
(alpha 0.3) into 100 clients of 82 train and 27 local-test images (independent class priors
for the two splits, as FIARSE's code); the global test set is the union of the local ones.
Model: ResNet-18 (FIARSE's CIFAR variant, static BN) at width 1/8 (8/16/32/64 channels,
176,402 parameters); the width methods' 1/64 level is width 1/8 of that (1/2/4/8 channels).
Training: 10 of 100 clients per round, 8 local SGD steps of batch 20 (about 2 local epochs of a
client's 82 images; the paper: 100 steps = 4 epochs of 500), lr 0.1, no momentum, server lr 1,
crop + flip, 800 rounds as the paper (about 155 passes over the pooled data), capacities
{1, 1/4, 1/16, 1/64} (25 clients each, interleaved). Clients run sharded over the two cores
(one CPU device per core).

Why 800 rounds and 8 steps (docs/results/fiarse.md, sessions 20-21): dense seed 0 reached
0.456 at 200 rounds and 0.507 at 400, still gaining ~1.7 points per 80 rounds; with 16 local
steps (4 epochs, the paper's epochs) it was *worse* at equal passes over the data (0.398 at
round 100 vs 0.456 at round 200 of 8 steps; 0.436 at 160 vs 0.473 at 320: more client drift
on Dirichlet-0.3 clients), so more local work does not buy convergence. 800 rounds must still
be shown converged on the dense rows (the sweep runs them first) before any method row is read. Evaluation (§4.9) every 20 rounds with batch 20: Model(s),
Local, Global per level, plus the 1 ... 1/256 size sweep on the global test set at the end.
FedRolex is evaluated on the official extraction window and, on the same trained model, on the
last round's window (`last_round_*` metrics).

Variants (per seed 0, 1, 2; init, sampling and training seeds all = the seed):
  dense          method=heterofl with capacities (1,): every client trains the full model, so
                 FedAvg with FIARSE's unweighted average (same driver, init, data order, records)
  fiarse_masked  FIARSE, the released code's gradient
  fiarse_tcb     FIARSE, the TCB-GD surrogate gradient
  heterofl, fedrolex, scalefl
Run the dense rows first and check convergence (last 20 % of rounds gain < 1 point,
REPRODUCE.md) before reading the others; if not converged, raise `rounds` for all. The sweep
lists only the dense rows until `dense_converged()` says the 3 archived dense runs
(docs/results/runs/fiarse_cifar10_converged) pass that check (`curves.tail_gain` < 0.01 at
`rounds`, each end the mean of 3 evaluations), so an unattended queue cannot spend the 15
method runs (~7 h) on a budget where dense has not converged; a dense run that fails it
stops the sweep with an error that gives its gain (then: a smaller setting, not more rounds;
docs/results/fiarse.md). The check was a hand-set flag until session 25.
Cost (quiet 2-core Intel Xeon, 2026-12-07, rounds 2-6 of 6-round runs): sharded FIARSE 1.84-2.04
s a round (unsharded 2.50-2.57, 1.32x), HeteroFL 1.66-1.69, FedRolex 1.73-1.87, ScaleFL
1.68-1.71 s; with evaluation every 20 rounds ~27-30 minutes a run (over REPRODUCE.md's 15:
convergence first), the 18 runs ~8.5 h.
"""
import os

from experiments import curves
from experiments.configs import cavp_cifar10, fiarse_cifar10

FOUR_LEVELS = fiarse_cifar10.FOUR_LEVELS
SIZE_SWEEP = fiarse_cifar10.SWEEP  # 1 ... 1/256
ARCHIVE = os.path.join(cavp_cifar10.RUNS_ARCHIVE, "fiarse_cifar10_converged")
SEEDS = (0, 1, 2)
VARIANTS = {
    "dense": {"method": "heterofl", "hetero.capacities": (1.0,)},
    "fiarse_masked": {"method": "fiarse", "hetero.fiarse_grad": "masked"},
    "fiarse_tcb": {"method": "fiarse", "hetero.fiarse_grad": "tcb"},
    "heterofl": {"method": "heterofl"},
    "fedrolex": {"method": "fedrolex"},
    "scalefl": {"method": "scalefl"},
}


def get_config(arg: str | None = None):
  """arg: '' (default) or 'sizes' (the 1 ... 1/256 size sweep every 50 rounds, not only at the end)."""
  if arg not in (None, "", "sizes"):
    raise ValueError(f"config arg must be '' or 'sizes', got {arg!r}")
  c = fiarse_cifar10.base_config("fiarse")
  c.data.data_dir = "../shared/data/cifar10/fedlore_pfllib_dir0.3_100clients"
  c.hetero.repartition = "balanced_dirichlet"
  c.hetero.alpha = 0.3
  c.hetero.num_clients = 100
  c.hetero.capacities = FOUR_LEVELS
  c.hetero.fedrolex_eval_also = ("last_round",)
  c.hetero.sweep = SIZE_SWEEP
  c.hetero.sweep_every = 50 if arg == "sizes" else 0  # 0: at the last round only
  c.model.width_multiplier = 1 / 8
  c.client.num_steps = 8
  c.rounds = 800  # the paper's T; 200 and 400 did not converge (docstring)
  c.clients_per_round = 10
  c.eval_every = 20
  c.checkpoint_every = 20
  c.shard_clients = True  # 1.32x a FIARSE round on 2 cores
  c.strategy = "sequential+tapgrad+sharded"
  c.progress = False
  return c


def dense_converged(archive: str | None = None) -> bool:
  """Whether every seed's dense run in `archive` (default ARCHIVE) has finished and passes
  REPRODUCE.md §1 at its rounds; False while any is missing.

  Raises:
    ValueError: a finished dense run did not converge (the message gives each one's gain), or
      two finished dense runs share a seed (the archive mixes settings).
  """
  archive = archive or ARCHIVE
  gains: dict[int, float | None] = {}
  for run, config in curves.archived_runs(archive):
    if config["method"] != "heterofl" or list(config["hetero"]["capacities"]) != [1.0]:
      continue
    seed = config["seeds"]["init"]
    if seed in gains:
      raise ValueError(f"{archive!r} holds two finished dense runs of seed {seed}: the archive "
                       "mixes settings")
    gains[seed] = curves.tail_gain(curves.read_curve(run), int(config["rounds"]))
  if any(seed not in gains for seed in SEEDS):
    return False
  failed = {seed: gain for seed, gain in gains.items() if gain is None or gain >= 0.01}
  if failed:
    raise ValueError(
        "dense FedAvg did not converge at its rounds (REPRODUCE.md §1: the last 20 % must gain "
        "< 1 point): " + ", ".join(f"seed {s} " + ("too few evaluations" if g is None else
                                                    f"gained {100 * g:.1f} points")
                                   for s, g in sorted(failed.items()))
        + "; shrink the setting (docs/results/fiarse.md), do not run the method rows")
  return True


def sweep(add):
  converged = dense_converged()
  for name, variant in VARIANTS.items():  # dense first: its convergence is checked before the rest
    if name != "dense" and not converged:
      continue
    for seed in SEEDS:
      add(**{"seeds.init": seed, "seeds.training": seed, "seeds.sampling": seed, **variant})
