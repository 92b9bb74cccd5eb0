"""Host-side client sampling: which clients train in a round.

Each sampler is a pure numpy function of an integer `seed` and the round index:
the generator is `np.random.default_rng([seed, round_idx])`, so a round's cohort
is reproducible on its own (resuming from a checkpoint at round r gives the same
cohorts as an uninterrupted run) and different rounds draw independently. The
returned ids are sorted; cohort order never matters because per-client keys are
`fold_in(round_key, client_id)`.

`poisson` draws each client independently (a cohort of random size, capped).
`pad_cohort` pads a cohort to a multiple of the device count with a valid dummy
id and a False entry in the active mask (weight 0), as the sharded round needs.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _round_rng(seed, round_idx):
  if int(seed) != seed or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if int(round_idx) != round_idx or round_idx < 0:
    raise ValueError(f"round_idx must be a non-negative integer, got {round_idx!r}")
  return np.random.default_rng([int(seed), int(round_idx)])


def _check_cohort(cohort_size, available, what):
  if int(cohort_size) != cohort_size or not 1 <= cohort_size <= available:
    raise ValueError(f"cohort_size must be an integer in [1, {available}] ({what}), "
                     f"got {cohort_size!r}")


def uniform(num_clients: int, cohort_size: int, seed: int, round_idx: int) -> np.ndarray:
  """Uniform sampling without replacement.

  Args:
    num_clients: population size n >= 1.
    cohort_size: C, 1 <= C <= n.
    seed: non-negative integer seed of the sampling stream.
    round_idx: non-negative round index.

  Returns:
    [C] int32 distinct client ids, sorted.

  Example:
    >>> ids = uniform(100, 10, seed=0, round_idx=3)
    >>> ids.shape, bool((ids == uniform(100, 10, seed=0, round_idx=3)).all())
    ((10,), True)
  """
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  _check_cohort(cohort_size, num_clients, "the number of clients")
  rng = _round_rng(seed, round_idx)
  return np.sort(rng.choice(int(num_clients), int(cohort_size), replace=False)).astype(np.int32)


def poisson(num_clients: int, sampling_probability: float, max_cohort: int, seed: int,
            round_idx: int) -> tuple[np.ndarray, int]:
  """Poisson sampling: every client joins independently with probability q.

  The sampling DP-FedAvg's accountant assumes (`federated.epsilon`'s Poisson event).
  A compiled round has a fixed number of client slots, so at most `max_cohort` clients
  train: when more are drawn, a uniform subset of `max_cohort` of them (the rest are
  dropped and counted; the accountant's guarantee is then not exact, so choose
  `max_cohort` where P(Binomial(n, q) > max_cohort) is negligible). The cohort may be
  empty (a round of padding only).

  Args:
    num_clients: population size n >= 1.
    sampling_probability: q in (0, 1].
    max_cohort: the round's client slots, >= 1.
    seed: non-negative integer seed of the sampling stream.
    round_idx: non-negative round index.

  Returns:
    ([k] int32 distinct ids, sorted, 0 <= k <= max_cohort; the number dropped).

  Example:
    >>> ids, dropped = poisson(300, 10 / 300, 20, seed=0, round_idx=3)
    >>> bool((ids == poisson(300, 10 / 300, 20, seed=0, round_idx=3)[0]).all()), dropped
    (True, 0)
  """
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  q = sampling_probability
  if isinstance(q, bool) or not isinstance(q, (int, float, np.floating)) or not 0 < q <= 1:
    raise ValueError(f"sampling_probability must be a number in (0, 1], got {q!r}")
  if isinstance(max_cohort, bool) or int(max_cohort) != max_cohort or max_cohort < 1:
    raise ValueError(f"max_cohort must be a positive integer, got {max_cohort!r}")
  rng = _round_rng(seed, round_idx)
  drawn = np.flatnonzero(rng.random(int(num_clients)) < q)
  dropped = max(drawn.size - int(max_cohort), 0)
  if dropped:
    drawn = rng.choice(drawn, int(max_cohort), replace=False)
  return np.sort(drawn).astype(np.int32), dropped


def proportional(num_examples, cohort_size: int, seed: int, round_idx: int) -> np.ndarray:
  """Sampling without replacement with probability proportional to client size.

  Draws are successive: each next client is drawn with probability proportional
  to its size among the clients not yet drawn (numpy's `choice(replace=False, p=)`).

  Args:
    num_examples: [n] non-negative client sizes (e.g. `ClientData.num_examples`).
    cohort_size: C, 1 <= C <= number of clients with size > 0.
    seed: non-negative integer seed of the sampling stream.
    round_idx: non-negative round index.

  Returns:
    [C] int32 distinct client ids, sorted.
  """
  sizes = np.asarray(num_examples, np.float64)
  if sizes.ndim != 1 or sizes.size == 0:
    raise ValueError(f"num_examples must be a non-empty 1-D array, got shape {sizes.shape}")
  if not np.all(np.isfinite(sizes)) or (sizes < 0).any():
    raise ValueError("num_examples must be finite and >= 0")
  _check_cohort(cohort_size, int((sizes > 0).sum()), "the number of non-empty clients")
  rng = _round_rng(seed, round_idx)
  ids = rng.choice(sizes.size, int(cohort_size), replace=False, p=sizes / sizes.sum())
  return np.sort(ids).astype(np.int32)


def fixed_schedule(schedule: Sequence[Sequence[int]], *,
                   cycle: bool = False) -> Callable[[int], np.ndarray]:
  """A predetermined cohort per round (replaying a logged run, tests).

  Args:
    schedule: schedule[r] = client ids of round r (each non-empty).
    cycle: if True, round r uses schedule[r % len(schedule)]; otherwise a round
      past the end raises IndexError.

  Returns:
    `sample(round_idx) -> [C_r] int32 ids` (in the schedule's order).
  """
  rounds = [np.asarray(ids, np.int32).reshape(-1) for ids in schedule]
  if not rounds:
    raise ValueError("schedule is empty: need at least one round")
  for r, ids in enumerate(rounds):
    if ids.size == 0:
      raise ValueError(f"schedule[{r}] is empty: every round needs at least one client")
    if (ids < 0).any():
      raise ValueError(f"schedule[{r}] has negative client ids")

  def sample(round_idx: int) -> np.ndarray:
    if int(round_idx) != round_idx or round_idx < 0:
      raise ValueError(f"round_idx must be a non-negative integer, got {round_idx!r}")
    if cycle:
      return rounds[int(round_idx) % len(rounds)].copy()
    if round_idx >= len(rounds):
      raise IndexError(f"round_idx={round_idx} is past the schedule's {len(rounds)} rounds "
                       f"(pass cycle=True to repeat it)")
    return rounds[int(round_idx)].copy()

  return sample


def pad_cohort(client_ids, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads a cohort to a multiple of `multiple` (e.g. the device count).

  Padding entries repeat `client_ids[0]` (a valid id, so gathers stay in
  bounds) and are marked inactive; give them weight 0.

  Args:
    client_ids: [C] client ids, C >= 1.
    multiple: pad length to a multiple of this, >= 1.

  Returns:
    (ids_C', active_C'): [C'] int32 ids and [C'] bool mask (True = real client;
    `active.astype(np.float32)` is the 0/1 aggregation weight mask), with
    C' = ceil(C / multiple) * multiple.

  Example:
    >>> pad_cohort([5, 2, 9], 4)
    (array([5, 2, 9, 5], dtype=int32), array([ True,  True,  True, False]))
  """
  ids = np.asarray(client_ids, np.int32).reshape(-1)
  if ids.size == 0:
    raise ValueError("client_ids is empty: need at least one client to pad from")
  if int(multiple) != multiple or multiple < 1:
    raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
  pad = (-ids.size) % int(multiple)
  active = np.concatenate([np.ones(ids.size, bool), np.zeros(pad, bool)])
  return np.concatenate([ids, np.full(pad, ids[0], np.int32)]), active
