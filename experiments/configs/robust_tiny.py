"""Tiny robust-aggregation runs (issue 28) for smoke tests: FedAvg on 8 synthetic writers.

Command:
  python -m experiments.main --config experiments/configs/robust_tiny.py:fedavg,median,sign_flip \
      --workdir /tmp/robust_tiny

`arg` = "method,aggregator[,attack]": method 'fedavg' (other methods: add the blocks to their
own configs with `add_robust`), aggregator one of `build.ROBUST_AGGREGATORS`, attack one of
`build.ATTACKS` (a quarter of the clients attack). MLP (784-16-10), 5 clients per round,
6 rounds: a few seconds on a 2-core CPU. This config exercises the machinery, not learning.
"""
import ml_collections

from experiments.configs import fedavg_tiny


def robust_block(aggregator: str = "mean") -> ml_collections.ConfigDict:
  """config.robust: the aggregator and its parameters (unused ones ignored)."""
  return ml_collections.ConfigDict(dict(
      aggregator=aggregator,   # mean | median | trimmed_mean | norm_bound | krum
      trim_fraction=0.1,       # trimmed_mean: fraction trimmed from EACH end, in [0, 0.5)
      max_norm=1.0,            # norm_bound: L2 bound of each client's update
      krum_f=1,                # krum: clients assumed Byzantine (clients_per_round >= 2 f + 3)
      krum_m=1))               # krum: clients selected (1 = Krum, > 1 = multi-Krum)


def attack_block(kind: str = "none", fraction: float = 0.0) -> ml_collections.ConfigDict:
  """config.attack: which clients attack (a fixed set drawn with `seed`) and how."""
  return ml_collections.ConfigDict(dict(
      kind=kind,               # none | sign_flip | scaled | gaussian | label_flip | backdoor
      fraction=fraction,       # fraction of all clients that attack, in [0, 1]
      seed=0,                  # draws the attackers
      scale=10.0,              # scaled: the update times scale (model replacement)
      sigma=1.0,               # gaussian: noise std added to the update, >= 0
      target=0,                # backdoor: the class triggered images are relabelled to
      trigger_size=3,          # backdoor: side of the square pixel trigger
      poison_fraction=0.5))    # backdoor: fraction of an attacker's images triggered


def add_robust(c, aggregator: str = "mean", attack: str = "none", fraction: float = 0.25):
  """Adds config.robust / config.attack blocks to any method's config `c`."""
  c.robust = robust_block(aggregator)
  c.attack = attack_block(attack, fraction if attack != "none" else 0.0)
  return c


def get_config(arg: str | None = None):
  method, aggregator, *attack = (arg or "fedavg,median").split(",")
  if method != "fedavg":
    raise ValueError(f"robust_tiny builds FedAvg runs; for {method!r} add the blocks to its "
                     "config with add_robust")
  c = fedavg_tiny.get_config()
  c.algorithm.name = "fedavg"
  c.data.num_clients = 8
  c.clients_per_round = 5
  c.rounds = 6
  return add_robust(c, aggregator, attack[0] if attack else "none")


def sweep(add):
  for aggregator in ("mean", "median", "trimmed_mean", "norm_bound", "krum"):
    add(**{"robust.aggregator": aggregator})
