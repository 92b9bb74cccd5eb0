"""Tiny compressed-update runs (issue 28) for smoke tests: FedAvg on 6 synthetic writers.

Command:
  python -m experiments.main --config experiments/configs/compress_tiny.py:4,0.25 \
      --workdir /tmp/compress_tiny

`arg` = "bits[,topk_fraction[,ef]]": bits per sent value ('none': unquantised), the
fraction of each tensor's held coordinates sent ('none': all), 'ef' or 'noef' (error
feedback, default on). MLP (784-16-10), 3 clients per round, 12 rounds: a few seconds on
a 2-core CPU. Records `bytes_up` (what the clients really sent: values, positions,
scales) and `bytes_up_uncompressed` (the dense float32 upload).
"""
import ml_collections

from experiments.configs import fedavg_tiny


def compression_block(bits=8, topk_fraction=None, error_feedback=True) -> ml_collections.ConfigDict:
  """config.compression: how each client compresses its update."""
  return ml_collections.ConfigDict(dict(
      bits=bits,                      # 1..32 bits per sent value (stochastic), None: unquantised
      topk_fraction=topk_fraction,    # (0, 1] of each tensor's held coordinates, None: all
      error_feedback=error_feedback))  # keep each client's residual (every method)


def add_compression(c, **kwargs):
  """Adds a config.compression block to any method's config `c`."""
  c.compression = compression_block(**kwargs)
  return c


def _none_or(value: str, cast):
  return None if value == "none" else cast(value)


def get_config(arg: str | None = None):
  bits, *rest = (arg or "8").split(",")
  c = fedavg_tiny.get_config()
  c.algorithm.name = "fedavg"
  add_compression(c, bits=_none_or(bits, int),
                  topk_fraction=_none_or(rest[0], float) if rest else None,
                  error_feedback=(rest[1] if len(rest) > 1 else "ef") == "ef")
  return c


def sweep(add):
  for bits in (1, 4, 8):
    add(**{"compression.bits": bits})
