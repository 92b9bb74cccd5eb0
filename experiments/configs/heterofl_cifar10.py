"""heterofl on CIFAR-10/100 with ResNet-18 in FIARSE's setting (its README commands).

Command:
  python -m experiments.main --config experiments/configs/heterofl_cifar10.py:cifar10 --workdir workdir/heterofl_c10

Same setting, data and evaluation as experiments/configs/fiarse_cifar10.py (see
its docstring; not measured at full scale here). Paper table (FIARSE's main
table, CIFAR-10) for this baseline: docs/results/fiarse.md, section "Paper".
"""
from experiments.configs import fiarse_cifar10


def get_config(arg: str | None = None):
  c = fiarse_cifar10.get_config(arg)
  c.method = "heterofl"
  c.hetero.layerwise = False
  return c
