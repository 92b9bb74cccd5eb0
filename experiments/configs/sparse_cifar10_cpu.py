"""Sparse-FL baselines, reduced CPU setting on the real 20-client CIFAR-10 subset.

Command (arg = method: feddst, prunefl, lotteryfl, snip, synflow, dense):
  python -m experiments.main --config experiments/configs/sparse_cifar10_cpu.py:feddst \
      --workdir workdir/feddst_cpu --config.sparse.density=0.05

Exactly the reduced setting of fedtiny_cifar10_cpu.py (VGG-11 at 1/8 width, ERK,
20 rounds x 5 clients x 4 local steps, FedTiny's schedule scaled to 20 rounds: FedDST
readjusts at ΔT = 1 before T_end = 12, FedTiny's rounds), with PruneFL adapting every 8
rounds up to T_end (once, at round 8) after 3 initial prune cycles (4 local steps each) on
its largest client, LotteryFL pruning in 3 steps every 3 rounds, SynFlow with 20 iterations.
Expected runtime: 1-3 minutes each on a 2-core CPU shared with other jobs.
Expected result (3 seeds, docs/results/fedtiny.md, measured with the earlier ΔT = 4,
T_end = 16), test accuracy at density 0.05 / 0.01:
FedDST 0.32 / 0.19, SNIP 0.29 / 0.16, SynFlow 0.28 / 0.19, LotteryFL 0.18 / 0.15,
PruneFL 0.15 / 0.16 (connected by its per-output-unit floor, but its adaptive step at
round 9 collapses training), dense FedAvg 0.31 (chance 0.10).
"""
from experiments.configs import fedtiny_cifar10, sparse_cifar10


def get_config(arg: str | None = None):
  method, model = sparse_cifar10.parse(arg, "vgg11")
  c = fedtiny_cifar10.base_config("vgg11", cpu=True)
  c.method = "sparse"
  c.sparse.method = method
  # PruneFL: entries kept per output unit of every layer (our choice; 0 = the paper's global top-k).
  c.sparse.prunefl_min_per_output = 1
  if model == "resnet18":
    c.model.name = "resnet18"
    c.model.width_multiplier = 1 / 8
  return c
