"""Tiny DP-FedAvg runs (issue 28) for smoke and resume tests: FedAvg on 6 synthetic writers.

Command:
  python -m experiments.main --config experiments/configs/dp_tiny.py:adaptive --workdir /tmp/dp_tiny

`arg` = "fixed" (default) or "adaptive" (Andrew et al.'s adaptive clip norm), optionally
followed by ",compressed" (4-bit updates with error feedback, `compress_tiny`). MLP
(784-16-10), 3 clients per round, 12 rounds: a few seconds on a 2-core CPU (mostly
compilation). Records `dp_epsilon` (at privacy.delta), `dp_clip_norm`,
`dp_clipped_fraction`. This config exercises the machinery, not learning: with 6 clients
no noise level gives a useful epsilon.
"""
import ml_collections

from experiments.configs import compress_tiny, fedavg_tiny


def privacy_block(noise_multiplier: float = 1.0, clip_norm: float = 1.0,
                  adaptive: bool = False) -> ml_collections.ConfigDict:
  """config.privacy: DP-FedAvg's parameters (the adaptive ones are used with adaptive=True)."""
  return ml_collections.ConfigDict(dict(
      noise_multiplier=noise_multiplier,  # z >= 0 (0: no noise, epsilon inf)
      clip_norm=clip_norm,                # C > 0, each client's update clipped to it (initial C)
      delta=1e-3,                         # epsilon is reported at this delta, in (0, 1)
      adaptive=adaptive,                  # adapt C to a quantile of the update norms
      target_quantile=0.5,                # gamma in [0, 1]
      clip_learning_rate=0.2,             # eta >= 0 of C <- C exp(-eta (b - gamma))
      count_stddev=None))                 # sigma_b >= 0 (None: clients_per_round / 20)


def add_privacy(c, **kwargs):
  """Adds a config.privacy block to any method's config `c`."""
  c.privacy = privacy_block(**kwargs)
  return c


def get_config(arg: str | None = None):
  clipping, *rest = (arg or "fixed").split(",")
  if clipping not in ("fixed", "adaptive") or rest not in ([], ["compressed"]):
    raise ValueError(f"dp_tiny takes 'fixed' or 'adaptive'[,compressed], got {arg!r}")
  c = fedavg_tiny.get_config()
  c.algorithm.name = "fedavg"
  # With only 3 clients, count noise of the default m / 20 could not carry z = 1 (it needs
  # sigma_b > z / 2): give the adaptive run its own.
  add_privacy(c, noise_multiplier=1.0, clip_norm=0.5, adaptive=clipping == "adaptive")
  if clipping == "adaptive":
    c.privacy.count_stddev = 1.0
  if rest:
    compress_tiny.add_compression(c, bits=4)
  return c


def sweep(add):
  for z in (0.0, 0.5, 1.0):
    add(**{"privacy.noise_multiplier": z})
