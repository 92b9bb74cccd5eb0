"""A tiny FedAvg run for smoke tests, resume tests, notebooks in CI and sweeps.

Command:
  python -m experiments.main --config experiments/configs/fedavg_tiny.py --workdir /tmp/tiny

MLP (784-16-10) on 6 synthetic writers, 3 clients per round, 12 rounds: a few
seconds on a 2-core CPU (mostly compilation). Expected: test accuracy above the
10 % chance level; this config exists to exercise the machinery, not to learn.
"""
from experiments.configs import fedavg_synthetic


def get_config(arg: str | None = None):
  del arg
  c = fedavg_synthetic.get_config()
  c.data.num_clients = 6
  c.data.examples_per_client = (6, 10)
  c.data.test_examples_per_client = 4
  c.model.name = "mlp"
  c.model.hidden = (16,)
  c.client.batch_size = 4
  c.client.learning_rate = 0.1
  c.algorithm.name = "fedavgm"  # server momentum: optimizer state to checkpoint
  c.rounds = 12
  c.clients_per_round = 3
  c.eval_every = 3
  c.checkpoint_every = 3
  c.strategy = "vmap+lax"
  c.progress = False
  return c


def sweep(add):
  for lr in (0.05, 0.1):
    add(**{"client.learning_rate": lr})
