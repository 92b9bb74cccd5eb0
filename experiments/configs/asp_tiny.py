"""A tiny ASP run on the embedded synthetic data (tests, notebook, smoke checks).

Command:
  python -m experiments.main --config experiments/configs/asp_tiny.py --workdir /tmp/asp_tiny

12 synthetic writers, FEMNIST CNN at widths [8, 16], 6 rounds (prune search
in rounds 1-3, k = 0.8), 4 clients/round, 1 local epoch, Adam lr 1e-3.
Expected: under a minute on a 2-core CPU; the architecture shrinks at least
once (summary `num_accepted` >= 1, `params` < `dense_params`).

Arg 'votes' (`--config experiments/configs/asp_tiny.py:votes`): the clients decide
(asp.decision='client_votes', strict majority, exact tallies; issue 28): each client votes
on its trained filters in the round, the server keeps the filters most voters keep. The
records carry the tallies (`votes/conv_0`, `votes/conv_1`, `voters`); same expectation.
"""
from experiments.configs import asp_femnist_cnn, fedavg_synthetic


ARGS = ("", "votes")


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in ARGS:
    raise ValueError(f"asp_tiny takes an arg in {ARGS}, got {arg!r}")
  c = fedavg_synthetic.get_config()
  c.data.num_clients = 12
  c.data.examples_per_client = (8, 16)
  c.data.test_examples_per_client = 4
  c.model.name = "asp_femnist_cnn"
  asp_femnist_cnn.paper_training(c, rounds=6, clients_per_round=4)
  c.client.num_epochs = 1
  c.client.batch_size = 8
  c.asp = asp_femnist_cnn.asp_fields(k=0.8, max_pruned_round=3)
  c.asp.widths = (8, 16)
  c.l1_filter.prune_round = 2
  c.eval_every = 3
  c.eval_batch_size = 64
  c.strategy = "vmap+lax"
  c.progress = False
  if arg == "votes":
    c.asp.decision = "client_votes"
    c.asp.vote_threshold = 0.5
    c.asp.vote_noise_multiplier = 0.0
    c.asp.vote_delta = 1e-3  # the delta of the records' `vote_epsilon` when z > 0
  return c
