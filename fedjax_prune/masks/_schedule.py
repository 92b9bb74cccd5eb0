"""Pruning schedules as functions of the round index.

Each function accepts a Python int round index (returning a Python value, for
host-side decisions and static densities) or a jax integer array (returning a
jax scalar, for use inside a jitted round). Hyperparameters are static and
validated eagerly.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_static(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating))


def _check_unit(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


def polynomial_sparsity(round_idx: Any, *, initial: float, final: float, begin: int,
                        end: int, power: float = 3.0) -> float | jax.Array:
  """Gradual pruning sparsity s(t) = final + (initial - final) * (1 - (t - begin) / (end - begin))**power.

  t is clipped to [begin, end], so s = initial before `begin` and s = final
  after `end`; s moves monotonically from initial to final.

  Args:
    round_idx: current round t (int or jax integer scalar).
    initial: sparsity at `begin`, in [0, 1].
    final: sparsity at `end`, in [0, 1].
    begin: first round of the ramp.
    end: last round of the ramp, > begin.
    power: exponent > 0 (3 in Zhu & Gupta: prune fast early, slowly late).

  Returns:
    Sparsity (1 - density): Python float for an int round, float32 scalar otherwise.

  References:
    Zhu & Gupta, "To prune, or not to prune", 2017.
  """
  _check_unit("initial", initial)
  _check_unit("final", final)
  if end <= begin:
    raise ValueError(f"end must be > begin={begin}, got {end}")
  if power <= 0:
    raise ValueError(f"power must be > 0, got {power}")
  span = float(end - begin)
  if _is_static(round_idx):
    frac = (min(max(float(round_idx), begin), end) - begin) / span
    return final + (initial - final) * (1.0 - frac) ** power
  t = jnp.clip(jnp.asarray(round_idx, jnp.float32), begin, end)
  frac = (t - begin) / span
  return jnp.float32(final) + jnp.float32(initial - final) * (1.0 - frac) ** power


def cosine_fraction(round_idx: Any, alpha: float, end: int) -> float | jax.Array:
  """Cosine-annealed update fraction f(t) = alpha / 2 * (1 + cos(pi * t / end)).

  The fraction of active weights pruned and regrown at a mask update; f(0) =
  alpha, f(end) = 0, t clipped to [0, end] (so 0 afterwards).

  Args:
    round_idx: current round t (int or jax integer scalar).
    alpha: initial fraction, in [0, 1].
    end: round T_end at which the fraction reaches 0, >= 1.

  Returns:
    Python float for an int round, float32 scalar otherwise.

  References:
    Evci et al., "Rigging the Lottery", ICML 2020; Huang et al., FedTiny, 2023.
  """
  _check_unit("alpha", alpha)
  if end < 1:
    raise ValueError(f"end must be >= 1, got {end}")
  if _is_static(round_idx):
    t = min(max(float(round_idx), 0.0), float(end))
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / end))
  t = jnp.clip(jnp.asarray(round_idx, jnp.float32), 0, end)
  return jnp.float32(alpha / 2.0) * (1.0 + jnp.cos(jnp.float32(math.pi) * t / end))


def should_update(round_idx: Any, every: int, begin: int = 0,
                  end: int | None = None) -> bool | jax.Array:
  """True on rounds t with t % every == 0 and begin <= t <= end (jaxpruner's periodic schedule).

  FedTiny's adjustment rounds (t % dT == 0 and 0 < t <= T_end) are
  `should_update(t, dT, begin=1, end=T_end)`.

  Args:
    round_idx: current round t (int or jax integer scalar).
    every: period, >= 1.
    begin: first round that may update.
    end: last round that may update; None for no end.

  Returns:
    Python bool for an int round, bool scalar otherwise.
  """
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  if end is not None and end < begin:
    raise ValueError(f"end must be >= begin={begin} (or None), got {end}")
  if _is_static(round_idx):
    t = int(round_idx)
    return t % every == 0 and t >= begin and (end is None or t <= end)
  t = jnp.asarray(round_idx)
  ok = jnp.logical_and(t % every == 0, t >= begin)
  if end is not None:
    ok = jnp.logical_and(ok, t <= end)
  return ok
