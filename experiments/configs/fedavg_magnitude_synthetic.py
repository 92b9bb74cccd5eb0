"""FedAvg + one-shot global magnitude pruning, MLP on the embedded synthetic data.

Command:
  python -m experiments.sweep --config experiments/configs/fedavg_magnitude_synthetic.py \
      --workdir /tmp/magnitude_sweep
  python -m experiments.plot --out /tmp/magnitude_plots /tmp/magnitude_sweep

MLP 784-200-200-10 (199k params), 100 synthetic writers, 10 clients/round,
30 rounds; after 10 rounds the server keeps the `prune_density` fraction of all
kernel weights with the largest magnitude (one global threshold; biases stay
dense) and training continues with these fixed masks. The sweep covers
densities 1.0 / 0.3 / 0.1 / 0.03. Runtime: about a minute per run on a 2-core
CPU. Expected: the dense and 30 % runs end close together; accuracy drops
as the density goes to 3 % (see docs/results/experiments.md for the measured values).
"""
from experiments.configs import fedavg_synthetic


def get_config(arg: str | None = None):
  del arg
  c = fedavg_synthetic.get_config()
  c.model.name = "mlp"
  c.model.hidden = (200, 200)
  c.strategy = "vmap+lax"
  c.rounds = 30
  c.eval_every = 2
  c.prune_density = 0.3
  c.prune_round = 10
  return c


def sweep(add):
  for density in (1.0, 0.3, 0.1, 0.03):
    add(prune_density=density)
