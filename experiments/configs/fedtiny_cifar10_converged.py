"""FedTiny vs dense FedAvg and the sparse baselines on real CIFAR-10, a CPU setting sized to
converge (issue 25; protocol ../shared/design/REPRODUCE.md).

Command (resumable; re-run it to continue, finished runs are skipped):
  python -m experiments.sweep --config experiments/configs/fedtiny_cifar10_converged.py \
      --workdir workdir/fedtiny_cifar10_converged

One cell (seed s runs with seeds.init = seeds.sampling = seeds.training = s):
  python -m experiments.main --config experiments/configs/fedtiny_cifar10_converged.py \
      --workdir workdir/fedtiny_conv_one --config.method=sparse --config.sparse.method=feddst \
      --config.sparse.density=0.01 --config.seeds.init=1 --config.seeds.sampling=1 \
      --config.seeds.training=1
  (FedTiny: --config.method=fedtiny; dense FedAvg: --config.method=sparse
  --config.sparse.method=dense; the baselines: --config.method=sparse
  --config.sparse.method=<feddst|prunefl|lotteryfl|snip|synflow>.)

Setting: the 20-client real CIFAR-10 subset in ../shared/data/cifar10 (PFLlib, label-Dirichlet
0.3, 8,265 train / 2,767 test images), VGG-11 (BN, CIFAR head) at 1/8 width (conv widths
8..64, 145,554 parameters, 5.18 MFLOPs; density 0.01 keeps 758 kernel weights, at 1/16 width
it would keep 14), 150 rounds x 10 of the 20 clients x 1 local epoch
(batch 32, ~13 steps per client), SGD lr 0.05 without momentum. Every sparse method trains
exactly these local steps (FedDST: no extra steps after its client prune/regrow) from the
same initial weights (`sparse.init_candidate` 0: the init key's, also FedTiny's candidate 0).
FedTiny: C = 5 ABNS candidates (seeds), pooled BN statistics, 4 blocks adjusted input->output,
α = 0.2 and the paper's ΔT 10 / T_end 300 per 500 rounds scaled to the 150 rounds (ΔT 3,
T_end 90: 29 adjustment rounds, each block adjusted 7-8 times; FedDST readjusts in the same
rounds). PruneFL: 5 initial prune cycles on its largest client, adapts every 15 rounds up to
T_end (50 of 500 scaled). LotteryFL: 5 pruning steps every 6 rounds (20 of 500 scaled).
SynFlow: 100 iterations. Layer densities ERK for FedTiny, FedDST and LotteryFL (the
library's and the paper's default is uniform; at this width uniform density 0.01 leaves the
216-entry first conv 1 weight and the 640-entry head 3, i.e. at most 3 reachable classes:
`--config.sparse.distribution=uniform` runs it anyway); PruneFL, SNIP and SynFlow select
globally.

Grid (`sweep`): dense seeds 0-2 first (REPRODUCE.md: dense must be shown converged first),
then seed 0 of every method x density {0.01, 0.05, 0.1}, then seeds 1 and 2, so an
interrupted sweep leaves a whole 1-seed table first. 57 runs.
Clients run sharded over the two cores (one CPU device per core, 5 clients each:
'sequential+tapgrad+sharded'). Measured 2026-12-07 on a quiet 2-core Intel Xeon (other jobs
paused; 5-round dense runs, rounds 2-5): 1.45-1.62 s a dense round sharded vs 1.83-2.17 s
unsharded (1.35x); FedTiny and the five baselines all run sharded (13-round smoke runs,
25-36 s each). So ~4-6 minutes a 150-round run with evaluation and ABNS, the 57 runs ~5 h.
(Earlier, on a machine shared with other jobs, unsharded: 3.4-4.2 s a round.) Result (all 57 runs,
2026-12-07, docs/results/fedtiny.md; mean of rounds 130-150 over 3 seeds): dense 0.484; at
density 0.1 / 0.05 / 0.01 FedTiny 0.455 / 0.442 / 0.255, FedDST 0.441 / 0.425 / 0.220,
PruneFL 0.402 / 0.334 / 0.153, LotteryFL 0.460 / 0.453 / 0.273, SNIP 0.438 / 0.437 / 0.149,
SynFlow 0.439 / 0.424 / 0.337. 3.6-36 min a run (6.9 h for the 57, partly shared).
"""
from experiments.configs import fedtiny_cifar10

METHODS = ("fedtiny", "feddst", "prunefl", "lotteryfl", "snip", "synflow")
DENSITIES = (0.01, 0.05, 0.1)
SEEDS = (0, 1, 2)


def get_config(arg: str | None = None):
  del arg
  c = fedtiny_cifar10.base_config("vgg11", cpu=True)
  c.method = "fedtiny"
  c.sparse.method = "feddst"  # read only with method='sparse' (the baselines' driver)
  c.sparse.density = 0.05
  c.rounds = 150
  c.clients_per_round = 10
  c.shard_clients = True  # 1.35x a round on 2 cores (docstring)
  c.strategy = "sequential+tapgrad+sharded"
  c.client.num_epochs = 1
  c.client.num_steps = 0  # one epoch of each client's data
  c.client.batch_size = 32
  c.client.learning_rate = 0.05
  c.client.momentum = 0.0
  c.eval_every = 10
  c.checkpoint_every = 10
  s = c.sparse
  s.adjust_every, s.adjust_end = 0, 0  # the paper's schedule scaled to `rounds`: 3 / 90
  s.num_candidates = 5
  s.num_blocks = 4
  s.post_adjust_steps = 0
  s.init_candidate = 0
  s.prunefl_init_iterations = 5
  s.prunefl_adjust_every = 15
  s.prunefl_min_per_output = 1  # our default (sparse_cifar10.py); 0 = the paper's global top-k
  s.lottery_prune_every = 6
  s.lottery_steps = 5
  s.synflow_iterations = 100
  return c


def cell(method: str, density: float | None = None, seed: int = 0) -> dict:
  """The overrides of one run: `method` in ('dense',) + METHODS, its density and seed."""
  out = {"seeds.init": seed, "seeds.sampling": seed, "seeds.training": seed}
  if method == "fedtiny":
    out["method"] = "fedtiny"
  else:
    out.update({"method": "sparse", "sparse.method": method})
  if method != "dense":
    out["sparse.density"] = density
  return out


def sweep(add):
  for seed in SEEDS:
    add(**cell("dense", seed=seed))
  for seed in SEEDS:
    for density in DENSITIES:
      for method in METHODS:
        add(**cell(method, density, seed))
