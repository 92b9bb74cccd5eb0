"""Compressed client updates on real FEMNIST (issue 28): accuracy vs bytes uploaded, with pruning.

Command:
  python -m experiments.main --config experiments/configs/compress_femnist.py:4,0.1 \
      --workdir workdir/compress_femnist_4bit_top10

`arg` = "bits[,topk_fraction[,density[,ef]]]": bits per sent value ('none': float32),
fraction of each tensor's held coordinates sent ('none': all), a one-shot magnitude-pruning
density (after 20 rounds; pruned coordinates are never sent), 'ef' for error feedback.
Setting of `fedavg_femnist` (LEAF CNN, 300 writers, 10 clients per round) for 600 rounds
(robust_femnist.ROUNDS: 300 did not converge dense FedAvg).
Records `bytes_up` (the cohort's real upload: values + positions + scales) and
`bytes_up_uncompressed`. Error feedback keeps one residual per writer on the server: 300 x
the model (about 7.8 GB for the 6.5M-parameter LEAF CNN, and in every checkpoint), so it
is off unless asked for. A round costs about FedAvg's (1.6 s on the CPU of
docs/results/fedavg.md) plus one top-k sort per tensor per client. Not yet run.
"""
from experiments.configs import compress_tiny, fedavg_femnist, robust_femnist


ROUNDS = robust_femnist.ROUNDS  # the same dense baseline as robust_femnist's


def get_config(arg: str | None = None):
  bits, *rest = (arg or "8").split(",")
  none_or = lambda v, cast: None if v == "none" else cast(v)
  c = fedavg_femnist.get_config()
  c.rounds = ROUNDS
  compress_tiny.add_compression(
      c, bits=none_or(bits, int), topk_fraction=none_or(rest[0], float) if rest else None,
      error_feedback=len(rest) > 2 and rest[2] == "ef")
  if len(rest) > 1 and float(rest[1]) < 1.0:
    c.prune_density = float(rest[1])
    c.prune_round = 20
  return c


def sweep(add):
  for bits in (None, 8, 4, 2, 1):
    for density in (1.0, 0.3):
      add(**{"compression.bits": bits, "prune_density": density})
