"""ASP vs dense FedAvg on real FEMNIST in a reduced setting that converges (issue 23).

Command (resumable; re-run it to continue, finished runs are skipped):
  python -m experiments.sweep --config experiments/configs/asp_femnist_converged.py \
      --workdir workdir/asp_femnist_converged400

The paper's FEMNIST CNN setting (`asp_femnist_cnn.py`: 5 local epochs, batch 32, Adam 1e-3,
k = 2.2, MAX_PRUNED_ROUND 50, patience 3, glorot_uniform kernels) with 20 clients per round
for 600 rounds instead of 50 for 500 (docs/results/asp.md). 200 rounds were not enough: dense
seed 0 gained 3.8 points over rounds 160-200 (0.700 -> 0.738; REPRODUCE.md asks < 1 point);
at 400 dense still gained +1.0 / +1.8 points over rounds 320-400 (seeds 0 / 1, 3-evaluation
means at each end), so the runs were extended to 600: re-running the sweep continues the
finished 400-round runs from their last checkpoint (bit-identical to 600-round runs; the
workdir keeps its old name).
Three variants from the same starting weights, per seed (0, 1, 2):
  dense        asp.max_pruned_round=0: the search ends before it starts (dense FedAvg
               through the same driver, so the same init, data order and records)
  asp_reinit   the faithful rule: both tails, re-initialise every accepted architecture
  asp_inherit  keep the surviving weights, lower tail only
Every record carries the dead-channel diagnostic (`active_channels`, `active_channels_min`).
Cost on a 2-core CPU (sharded over 2 CPU devices): a dense round ~1.5 s when the machine is
quiet (~15 min a dense run), less once pruned; the 9 runs ~2 h (several times that under load).
"""
from experiments.configs import asp_femnist_cnn

VARIANTS = {
    "dense": {"asp.max_pruned_round": 0},
    "asp_reinit": {},
    "asp_inherit": {"asp.reinit_on_prune": False, "asp.tails": "lower"},
}


def get_config(arg: str | None = None):
  c = asp_femnist_cnn.get_config(arg)
  c.rounds = 600
  c.clients_per_round = 20
  c.eval_every = 10
  c.checkpoint_every = 10
  c.strategy = "sequential+tapgrad"
  c.progress = False
  return c


def sweep(add):
  for seed in (0, 1, 2):
    for fields in VARIANTS.values():
      add(**{"seeds.init": seed, "seeds.training": seed, "seeds.sampling": seed, **fields})
