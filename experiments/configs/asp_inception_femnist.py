"""ASP with the paper's Inception-style model on real FEMNIST.

Command:
  python -m experiments.main --config experiments/configs/asp_inception_femnist.py --workdir workdir/asp_incep_femnist

Setting (the paper's official code): widths [32, 16,16,16, 32,32,32, 96, 96]
(246,236 params, 31,010,894 FLOPs), 500 rounds, 10 clients/round, 5 local
epochs, batch 32, Adam lr 1e-3, k = 2.5, MAX_PRUNED_ROUND 100, patience 3.
Expected runtime: ~4x the FEMNIST CNN per client step (~5 h on a 2-core CPU at
10 clients/round). Expected result (official notebook): params -> ~84,719
(-65.6 %), test accuracy 80.7 % vs 82.2 % unpruned.
"""
from experiments.configs import asp_femnist_cnn


def get_config(arg: str | None = None):
  c = asp_femnist_cnn.get_config(arg)
  c.model.name = "asp_inception"
  asp_femnist_cnn.paper_training(c, clients_per_round=10)
  c.asp = asp_femnist_cnn.asp_fields(k=2.5, max_pruned_round=100)
  return c
