"""DP-FedAvg on real FEMNIST (issue 28): accuracy vs epsilon, dense and pruned.

Command:
  python -m experiments.main --config experiments/configs/dp_femnist.py:1.0 \
      --workdir workdir/dp_femnist_z1.0

`arg` = "noise_multiplier[,adaptive[,density]]": z (0 = clipping only, epsilon inf),
'fixed' (default) or 'adaptive' clipping (median of the update norms, Andrew et al.), and
an optional one-shot magnitude-pruning density (after `prune_round` = 20 rounds; noise and
clipping then on the kept coordinates only). Setting of `fedavg_femnist` (LEAF CNN, 300
writers, 10 clients per round: q = 1/30, 1 epoch, B 32, SGD 0.05) for 600 rounds (robust_femnist.ROUNDS:
300 did not converge dense FedAvg); clip norm C = 1.0 (initial C under adaptive clipping), delta = 1e-3 (< 1/300). Records `dp_epsilon`
per round (RDP accountant), `dp_clip_norm`, `dp_clipped_fraction`. One round takes about
as long as FedAvg's (1.6 s on the CPU of docs/results/fedavg.md: clipping and noise are a
few passes over the model). Not yet run: no measured numbers.
"""
from experiments.configs import dp_tiny, fedavg_femnist, robust_femnist


ROUNDS = robust_femnist.ROUNDS  # the same dense baseline as robust_femnist's


def get_config(arg: str | None = None):
  z, *rest = (arg or "1.0").split(",")
  adaptive = bool(rest) and rest[0] == "adaptive"
  c = fedavg_femnist.get_config()
  c.rounds = ROUNDS
  dp_tiny.add_privacy(c, noise_multiplier=float(z), clip_norm=1.0, adaptive=adaptive)
  c.privacy.count_stddev = None  # clients_per_round / 20 = 0.5: needs z < 1 with adaptive
  if adaptive and float(z) >= 1.0:
    c.privacy.count_stddev = float(z)  # sigma_b > z / 2
  if len(rest) > 1:
    c.prune_density = float(rest[1])
    c.prune_round = 20
  return c


def sweep(add):
  for z in (0.0, 0.3, 0.5, 1.0, 2.0):
    for density in (1.0, 0.3):
      add(**{"privacy.noise_multiplier": z, "prune_density": density})
