"""ASP (automatic structured pruning) with the paper's FEMNIST CNN on real FEMNIST.

Command:
  python -m experiments.main --config experiments/configs/asp_femnist_cnn.py --workdir workdir/asp_femnist

Setting (official notebook `fl_cnn_prune_femnist.ipynb`): CNN
[32, 64] (conv5x5 valid -> pool -> conv5x5 valid -> pool -> GAP -> 62), 500
rounds, 50 clients/round, 5 local epochs, batch 32, Adam lr 1e-3, k = 2.2 (both
tails), MAX_PRUNED_ROUND 50, patience 3, re-initialise on every accepted prune,
glorot_uniform kernels (Keras' default, as the official code).
Data: the LEAF FEMNIST samples in ../shared/data/femnist (300 writers, natural
by-writer split; the paper used TFF's 3,400 writers with a centre-crop).

Expected runtime on a 2-core CPU (sharded over 2 CPU devices, sequential+tapgrad): a dense
round ~5 s, ~45 min for 500 rounds, less after pruning; minutes on one GPU. The measured
full-scale dense vs ASP sweep is `asp_femnist_fullscale.py`. Expected result (official notebook,
one run): params 56,126 -> ~21,488 (-62 %), FLOPs -62 %, test accuracy
~71.6 % vs 74.8 % unpruned. Measured results: docs/results/asp.md. Dense baseline: the same
config with --config.asp.max_pruned_round=0 (the same driver, starting weights and data order).
"""
from experiments.configs import fedavg_femnist
import ml_collections


def asp_fields(k: float = 2.2, max_pruned_round: int = 50) -> ml_collections.ConfigDict:
  """The ASP knobs with the official code's defaults (Keras' glorot_uniform kernels)."""
  return ml_collections.ConfigDict(dict(
      k=k, tails="both", max_patience=3, max_pruned_round=max_pruned_round,
      reinit_on_prune=True, rounds_between_prunes=1, widths=(), kernel_init="glorot_uniform"))


def paper_training(c, *, rounds: int = 500, clients_per_round: int = 50) -> None:
  """5 local epochs, batch 32, Adam lr 1e-3 (Keras defaults), FedAvg."""
  c.method = "asp"
  c.algorithm.name = "fedavg"
  c.algorithm.server_learning_rate = 1.0
  c.client.optimizer = "adam"
  c.client.learning_rate = 1e-3
  c.client.momentum = 0.0
  c.client.batch_size = 32
  c.client.num_epochs = 5
  c.client.num_steps = 0
  c.rounds = rounds
  c.clients_per_round = clients_per_round
  c.l1_filter = ml_collections.ConfigDict(dict(ratio=0.5, prune_round=50))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = fedavg_femnist.get_config(arg)
  c.model.name = "asp_femnist_cnn"
  paper_training(c)
  c.asp = asp_fields(k=2.2, max_pruned_round=50)
  c.eval_every = 10
  return c


def sweep(add):
  for k in (1.0, 1.5, 2.2):
    add(**{"asp.k": k})
