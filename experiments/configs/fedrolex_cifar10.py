"""fedrolex on CIFAR-10/100 with ResNet-18 in FIARSE's setting (its README commands).

Command:
  python -m experiments.main --config experiments/configs/fedrolex_cifar10.py:cifar10 --workdir workdir/fedrolex_c10

Same setting, data and evaluation as experiments/configs/fiarse_cifar10.py (see
its docstring; not measured at full scale here). A width-r level is evaluated on the window the
official server extracts at evaluation time (`hetero.fedrolex_eval_window='extraction'`; the
official code's lines in `fedjax_prune/pruning/fedrolex.py`) and, on the same trained model, on
the window the last round trained (`hetero.fedrolex_eval_also=('last_round',)`, recorded as
`last_round_<metric>`); `--config.hetero.fedrolex_eval_window=last_round
--config.hetero.fedrolex_eval_also='()'` evaluates the last round's window only. Paper table (FIARSE's main
table, CIFAR-10) for this baseline: docs/results/fiarse.md, section "Paper".
"""
from experiments.configs import fiarse_cifar10


def get_config(arg: str | None = None):
  c = fiarse_cifar10.get_config(arg)
  c.method = "fedrolex"
  c.hetero.layerwise = False
  c.hetero.fedrolex_eval_window = "extraction"
  c.hetero.fedrolex_eval_also = ("last_round",)
  return c
