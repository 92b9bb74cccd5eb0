"""Robust FedAvg on real FEMNIST (issue 28): a defence against a fraction of attackers.

Command:
  python -m experiments.main --config experiments/configs/robust_femnist.py:median,sign_flip,0.2 \
      --workdir workdir/robust_femnist_median_signflip_20

`arg` = "aggregator[,attack[,fraction]]" (aggregators: `build.ROBUST_AGGREGATORS`, attacks:
`build.ATTACKS`, fraction of the 300 writers that attack, default 0.2). Setting of
`fedavg_femnist` (LEAF CNN, 10 clients per round, 1 epoch, B 32, SGD 0.05) for 600 rounds:
dense FedAvg (the mean without attackers) gained ~3 points over rounds 240-300 (0.753 @ 200,
0.814 @ 300, seed 0), so 300 did not converge (REPRODUCE.md §1).
Krum assumes f = 3 of the 10 clients per round, the trimmed mean trims 30 % from each end;
the backdoor relabels triggered images to class 0 and reports `backdoor_asr` at every
evaluation. The pruned cells set `prune_density` (global magnitude pruning after round
20). Results: docs/results/robust.md.
"""
from experiments.configs import fedavg_femnist, robust_tiny


ROUNDS = 600  # shared by dp_femnist and compress_femnist: one dense baseline for the three
PRUNED_DENSITY, PRUNE_ROUND = 0.3, 20  # the pruned cells: one-shot magnitude pruning


def get_config(arg: str | None = None):
  aggregator, *rest = (arg or "median").split(",")
  attack = rest[0] if rest else "none"
  fraction = float(rest[1]) if len(rest) > 1 else 0.2
  c = fedavg_femnist.get_config()
  c.rounds = ROUNDS
  robust_tiny.add_robust(c, aggregator, attack, fraction)
  c.robust.krum_f = 3
  # Trim 3 of the 10 clients from each end: covers the expected 3 attackers of a round
  # at 30 % (robust_tiny's 0.1 would trim 1).
  c.robust.trim_fraction = 0.3
  c.prune_round = PRUNE_ROUND  # used when a cell sets prune_density < 1 (off by default)
  return c


AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_bound", "krum")


def sweep(add):
  """Seed 0, ordered so that an interrupted sweep leaves the most telling cells done:
  dense FedAvg (mean, no attackers) first; every defence at 20 % sign-flip attackers and
  at 0 % (what robustness costs without attack); 30 % and 10 %; then pruned (one-shot
  magnitude pruning to density 0.3 after 20 rounds) with the mean, median and trimmed
  mean at 0 / 20 %; then the backdoor at 20 % (attack-success rate) under the mean,
  norm bounding and the median. The headline cells (the dense baseline, every defence at
  20 %) get seeds 1 and 2 after the seed-0 grid. 41 runs, ~8 min each on the 2-core CPU
  (~0.75 s a round)."""
  sign_flip = lambda aggregator, fraction, **kw: add(**{
      "robust.aggregator": aggregator, "attack.kind": "sign_flip", "attack.fraction": fraction,
      **kw})
  sign_flip("mean", 0.0)
  for fraction in (0.2, 0.0, 0.3, 0.1):
    for aggregator in AGGREGATORS:
      if (aggregator, fraction) != ("mean", 0.0):
        sign_flip(aggregator, fraction)
  # the headline cells (dense baseline; every defence at 20 %) get seeds 1 and 2
  for seed in (1, 2):
    seeds = {"seeds.init": seed, "seeds.sampling": seed, "seeds.training": seed}
    sign_flip("mean", 0.0, **seeds)
    for aggregator in AGGREGATORS:
      sign_flip(aggregator, 0.2, **seeds)
  for aggregator in ("mean", "median", "trimmed_mean"):
    for fraction in (0.0, 0.2):
      sign_flip(aggregator, fraction, prune_density=PRUNED_DENSITY)
  for aggregator in ("mean", "norm_bound", "median"):
    add(**{"robust.aggregator": aggregator, "attack.kind": "backdoor", "attack.fraction": 0.2})
