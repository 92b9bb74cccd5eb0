"""Sparse-FL baselines of FedTiny on CIFAR-10 (paper settings), ResNet-18 or VGG-11.

Command (arg = 'method,model'; method in feddst, prunefl, lotteryfl, snip, synflow, dense):
  python -m experiments.main --config experiments/configs/sparse_cifar10.py:feddst,resnet18 \
      --workdir workdir/feddst_r18_d005 --config.sparse.density=0.05

Same data, model and training settings as fedtiny_cifar10.py (100 clients,
10 per round, Dirichlet 0.5, 500 rounds, ΔT = 10, T_end = 300, α = 0.2); PruneFL
adapts every 50 rounds, LotteryFL prunes in 5 steps every 20 rounds.
Expected runtime: about 3-6 GPU-hours each for ResNet-18 on one H100 (not
measured). Expected result (FedTiny paper, abstract): below FedTiny at very low
density; dense FedAvg is the accuracy ceiling.
"""
from experiments.configs import fedtiny_cifar10


def parse(arg: str | None, default_model: str):
  parts = [p for p in (arg or "feddst").split(",") if p]
  method = parts[0]
  model = parts[1] if len(parts) > 1 else default_model
  return method, model


def get_config(arg: str | None = None):
  method, model = parse(arg, "resnet18")
  c = fedtiny_cifar10.base_config(model)
  c.method = "sparse"
  c.sparse.method = method
  # PruneFL: entries kept per output unit of every layer (our choice; 0 = the paper's global top-k).
  c.sparse.prunefl_min_per_output = 1
  return c


def sweep(add):
  for method in ("feddst", "prunefl", "lotteryfl", "snip", "synflow"):
    for d in fedtiny_cifar10.DENSITIES:
      add(**{"sparse.method": method, "sparse.density": d})
