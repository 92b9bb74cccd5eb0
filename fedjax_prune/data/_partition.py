"""Federated partitioners: split a pooled dataset into per-client index arrays.

Every partitioner is a pure host-side numpy function of its arguments and an
integer `seed` (turned into `np.random.default_rng(seed)` at this numpy
boundary). It returns `parts`, a list with one int64 index array per client into
the pooled dataset; `partition_arrays(x, y, parts)` turns those into the engine's
stacked `ClientData`. Unless stated otherwise, the parts are disjoint, cover every
example, and each client's order was shuffled once at partition time (client
loaders then read in order, as FIARSE's `shuffle=False` loaders do).

Per-client test sets (local evaluation, as FIARSE's code): call the same partitioner
separately on the test labels, with a different seed, e.g.
`dirichlet(y_test, n, alpha, seed + 1)`; the union of the test parts is the whole
test split, i.e. the server's global test set. For balanced Dirichlet,
`balanced_dirichlet_train_test` does this and optionally reuses the train class
priors (`share_priors=True`); FIARSE's code draws independent priors (the
default; probably unintended there, kept for a faithful replication).

References:
  McMahan et al., Communication-Efficient Learning of Deep Networks from
  Decentralized Data, AISTATS 2017 (shards).
  Hsu, Qi, Brown, Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification, arXiv 1909.06335 (per-class Dirichlet).
  Wang et al., Federated Learning with Matched Averaging, ICLR 2020 (the
  "skip clients above N/n" balancing used by most Dirichlet partitioners).
  Wu et al., FIARSE, NeurIPS 2024, `data/data_utils.py` (balanced Dirichlet,
  after FedLab's `client_inner_dirichlet_partition`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fedjax_prune.data._client_data import ClientData, from_client_lists

Parts = list  # list[np.ndarray]: one int64 index array per client


# ----------------------------------------------------------------------------- validation


def _check_num_clients(num_clients, num_examples):
  if int(num_clients) != num_clients or num_clients <= 0:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if num_clients > num_examples:
    raise ValueError(f"num_clients={num_clients} is larger than the number of examples "
                     f"({num_examples}); need 1 <= num_clients <= {num_examples}")


def _check_alpha(alpha, name="alpha"):
  if not np.isfinite(alpha) or alpha <= 0:
    raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}")


def _labels(labels, num_classes=None):
  """Validates integer labels in [0, K); returns (labels [N] int64, K)."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}")
  if labels.size == 0:
    raise ValueError("labels is empty: need at least one example")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.min() < 0:
    raise ValueError(f"labels must be >= 0, got min {labels.min()}")
  k = int(labels.max()) + 1
  if num_classes is not None:
    if num_classes < k:
      raise ValueError(f"num_classes={num_classes} but labels go up to {k - 1}; "
                       f"need num_classes >= {k}")
    k = int(num_classes)
  return labels.astype(np.int64), k


# ----------------------------------------------------------------------------- helpers


def partition_arrays(x, y, parts: Sequence[np.ndarray], *, pad_to: int | None = None,
                     allow_empty: bool = False) -> ClientData:
  """Gathers per-client examples into a stacked, padded `ClientData`.

  Args:
    x: [N, ...] pooled inputs (numpy).
    y: [N, ...] pooled labels / targets.
    parts: per-client index arrays into the pooled axis (a partitioner's output).
    pad_to: pad the example axis to this length (default: the largest client).
    allow_empty: allow clients with no examples.

  Returns:
    ClientData with x [n, E, ...], y [n, E, ...], num_examples [n] (host arrays).
  """
  x, y = np.asarray(x), np.asarray(y)
  if len(x) != len(y):
    raise ValueError(f"x has {len(x)} examples but y has {len(y)}")
  for k, p in enumerate(parts):
    p = np.asarray(p)
    if p.size and (p.min() < 0 or p.max() >= len(x)):
      raise ValueError(f"parts[{k}] has indices outside [0, {len(x)})")
  return from_client_lists([x[np.asarray(p, np.int64)] for p in parts],
                           [y[np.asarray(p, np.int64)] for p in parts],
                           pad_to=pad_to, allow_empty=allow_empty)


def partition_class_counts(labels, parts: Sequence[np.ndarray],
                           num_classes: int | None = None) -> np.ndarray:
  """Per-client label histogram.

  Args:
    labels: [N] integer labels of the pooled dataset.
    parts: per-client index arrays.
    num_classes: K (default: max label + 1).

  Returns:
    [n, K] int64 counts, row i = class histogram of client i.
  """
  labels, k = _labels(labels, num_classes)
  return np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=k) for p in parts])


# ----------------------------------------------------------------------------- partitioners


def natural(user_ids) -> Parts:
  """Natural split: one client per distinct user id (e.g. a writer in FEMNIST).

  Args:
    user_ids: [N] hashable-as-numpy ids (ints or strings), one per example.

  Returns:
    One index array per distinct id, clients ordered by sorted id
    (`np.unique` order); indices within a client keep their original order.
  """
  user_ids = np.asarray(user_ids)
  if user_ids.ndim != 1 or user_ids.size == 0:
    raise ValueError(f"user_ids must be a non-empty 1-D array, got shape {user_ids.shape}")
  _, inverse = np.unique(user_ids, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  counts = np.bincount(inverse)
  return np.split(order.astype(np.int64), np.cumsum(counts)[:-1])


def iid(num_examples: int, num_clients: int, seed: int) -> Parts:
  """IID split: a random permutation cut into `num_clients` near-equal parts.

  Args:
    num_examples: N, size of the pooled dataset.
    num_clients: n, 1 <= n <= N.
    seed: integer seed.

  Returns:
    n disjoint index arrays covering range(N); sizes differ by at most one.

  Example:
    >>> [len(p) for p in iid(10, 3, seed=0)]
    [4, 3, 3]
  """
  _check_num_clients(num_clients, num_examples)
  rng = np.random.default_rng(seed)
  return np.array_split(rng.permutation(num_examples).astype(np.int64), num_clients)


def size_skew(num_examples: int, num_clients: int, sigma: float, seed: int) -> Parts:
  """Quantity skew: IID labels, log-normal client sizes.

  Sizes are proportional to w_i ~ LogNormal(0, sigma) with every client getting
  at least one example; the examples are a random permutation of range(N).

  Args:
    num_examples: N.
    num_clients: n, 1 <= n <= N.
    sigma: log-normal shape, >= 0 (0 gives near-equal sizes).
    seed: integer seed.

  Returns:
    n disjoint index arrays covering range(N).
  """
  _check_num_clients(num_clients, num_examples)
  if not np.isfinite(sigma) or sigma < 0:
    raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
  rng = np.random.default_rng(seed)
  w = rng.lognormal(0.0, sigma, num_clients)
  spare = num_examples - num_clients  # every client gets 1, the rest by weight
  share = w / w.sum() * spare
  sizes = np.floor(share).astype(np.int64)
  rest = spare - sizes.sum()
  sizes[np.argsort(-(share - sizes), kind="stable")[:rest]] += 1
  sizes += 1
  return np.split(rng.permutation(num_examples).astype(np.int64), np.cumsum(sizes)[:-1])


def dirichlet(labels, num_clients: int, alpha: float, seed: int, *, min_size: int = 10,
              max_retries: int = 1000) -> Parts:
  """Label-skew split: per-class client proportions q_c ~ Dir(alpha * 1_n).

  For each class c, the class's (shuffled) examples are cut among clients in
  proportions q_c, except that clients already holding >= N/n examples get none
  (the FedMA / Hsu et al. balancing trick). The whole draw is repeated until
  every client holds >= `min_size` examples. Small alpha: each client holds few
  classes; alpha -> infinity: IID.

  Args:
    labels: [N] integer class ids.
    num_clients: n, 1 <= n <= N.
    alpha: concentration, > 0.
    seed: integer seed.
    min_size: minimum examples per client, 0 <= min_size <= N // n.
    max_retries: number of redraws before giving up with a ValueError.

  Returns:
    n disjoint index arrays covering every example, each shuffled.

  Example:
    >>> labels = np.repeat(np.arange(10), 100)
    >>> parts = dirichlet(labels, 5, alpha=0.5, seed=0)
    >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 10
    (1000, True)
  """
  labels, k = _labels(labels)
  n_total = labels.size
  _check_num_clients(num_clients, n_total)
  _check_alpha(alpha)
  if min_size < 0 or min_size * num_clients > n_total:
    raise ValueError(f"min_size={min_size} is impossible with {n_total} examples and "
                     f"{num_clients} clients; need 0 <= min_size <= {n_total // num_clients}")
  if max_retries < 1:
    raise ValueError(f"max_retries must be >= 1, got {max_retries}")
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(labels == c) for c in range(k)]
  cap = n_total / num_clients
  best = 0
  for _ in range(max_retries):
    chunks = [[] for _ in range(num_clients)]
    sizes = np.zeros(num_clients, np.int64)
    for idx_c in by_class:
      if idx_c.size == 0:
        continue
      idx_c = rng.permutation(idx_c)
      q = rng.dirichlet(np.full(num_clients, alpha))
      open_ = sizes < cap
      q = q * open_
      # Tiny alpha can underflow every open client's share to 0: spread uniformly then.
      q = q / q.sum() if q.sum() > 0 else open_ / open_.sum()
      cuts = (np.cumsum(q) * idx_c.size).astype(np.int64)[:-1]
      for i, piece in enumerate(np.split(idx_c, cuts)):
        if piece.size:
          chunks[i].append(piece)
          sizes[i] += piece.size
    best = max(best, int(sizes.min()))
    if sizes.min() >= min_size:
      return [rng.permutation(np.concatenate(c)) if c else np.zeros(0, np.int64) for c in chunks]
  raise ValueError(f"dirichlet: no draw in max_retries={max_retries} gave every client >= "
                   f"min_size={min_size} examples (best minimum {best}); lower min_size, "
                   f"raise alpha or max_retries, or use fewer clients")


def dirichlet_class_priors(num_clients: int, num_classes: int, alpha: float, seed: int) -> np.ndarray:
  """Per-client class priors p_i ~ Dir(alpha * 1_K), as `balanced_dirichlet` draws them.

  `balanced_dirichlet(labels, n, alpha, seed, num_classes=K)` draws exactly
  these priors (from their own stream of `seed`), so passing them back as
  `class_priors` with the same seed reproduces its partition.

  Args:
    num_clients: n > 0.
    num_classes: K > 0.
    alpha: concentration, > 0.
    seed: integer seed.

  Returns:
    [n, K] float64 rows on the simplex.
  """
  if int(num_clients) != num_clients or num_clients <= 0:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if int(num_classes) != num_classes or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  _check_alpha(alpha)
  return _draw_priors(_prior_and_sampling_rngs(seed)[0], num_clients, num_classes, alpha)


def _prior_and_sampling_rngs(seed):
  """Independent streams for the class priors and for everything else, so that
  explicit priors reproduce the partition drawn with the same seed."""
  prior_ss, sample_ss = np.random.SeedSequence(seed).spawn(2)
  return np.random.default_rng(prior_ss), np.random.default_rng(sample_ss)


def _draw_priors(rng, n, k, alpha):
  return rng.dirichlet(np.full(k, alpha), size=n)


def _draw_categorical(rng, priors_nxK, rows_R, avail_K, chunk=1 << 15):
  """One class per step r from priors[rows[r]] restricted to `avail` (renormalised).

  A row with no mass on any available class (Dirichlet underflow at tiny alpha)
  draws uniformly among the available classes instead.
  """
  out = np.empty(len(rows_R), np.int64)
  avail = avail_K.astype(np.float64)
  for s in range(0, len(rows_R), chunk):
    p = priors_nxK[rows_R[s:s + chunk]] * avail[None, :]
    total = p.sum(1, keepdims=True)
    dead = total[:, 0] <= 0
    if dead.any():
      p[dead] = avail[None, :]
      total[dead] = avail.sum()
    cdf = np.cumsum(p, axis=1)
    u = rng.random(len(p))[:, None] * cdf[:, -1:]
    cls = (cdf <= u).sum(1)
    # Guard the u == total rounding edge: the last class with mass in that row.
    last = (p.shape[1] - 1) - np.argmax((p > 0)[:, ::-1], axis=1)
    out[s:s + chunk] = np.minimum(cls, last)
  return out


def _client_order(rng, n, m):
  """Sequence of client picks: each step a uniform not-yet-full client (quota m each).

  Within a block drawn uniformly over the currently open clients, dropping a
  client's picks beyond its remaining quota is exactly rejection of full
  clients, so the result has FedLab/FIARSE's law without a Python loop per step.
  """
  remaining = np.full(n, m, np.int64)
  out = []
  while remaining.sum() > 0:
    open_ids = np.flatnonzero(remaining > 0)
    draw = open_ids[rng.integers(0, open_ids.size, size=int(remaining.sum()))]
    rank = _rank_within_group(draw, n)
    keep = rank < remaining[draw]
    kept = draw[keep]
    out.append(kept)
    remaining -= np.bincount(kept, minlength=n)
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def _rank_within_group(groups, num_groups):
  """rank[t] = #{s < t : groups[s] == groups[t]}."""
  order = np.argsort(groups, kind="stable")
  starts = np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=num_groups))[:-1]])
  rank = np.empty(groups.size, np.int64)
  rank[order] = np.arange(groups.size) - starts[groups[order]]
  return rank


def balanced_dirichlet(labels, num_clients: int, alpha: float, seed: int, *,
                       num_classes: int | None = None,
                       class_priors: np.ndarray | None = None) -> Parts:
  """FIARSE's balanced Dirichlet split (its `data/data_utils.py`): equal sizes, skewed labels.

  Every client gets exactly m = floor(N / n) examples. Each client draws a class
  prior p_i ~ Dir(alpha * 1_K). Then, repeatedly, a uniformly random client that
  is not yet full draws a class from p_i and takes the next unused example of
  that class, re-drawing the class while it is exhausted, until all clients hold
  m examples. The N - n*m leftover examples are unassigned.

  Implemented without a per-sample Python loop: the client sequence is drawn in
  blocks (see `_client_order`), all classes are drawn at once, and each time a
  class runs out the later draws of it are re-drawn from the prior restricted
  to the classes still available (the law of "re-draw while exhausted"). At
  most K such passes. Where a client's prior has no mass left on any available
  class (float underflow at tiny alpha; FIARSE's loop would spin forever) it
  draws uniformly among the available classes.

  Args:
    labels: [N] integer class ids.
    num_clients: n, 1 <= n <= N.
    alpha: concentration, > 0 (ignored when `class_priors` is given).
    seed: integer seed.
    num_classes: K (default max label + 1); fix it when train and test splits
      must share prior shapes.
    class_priors: optional [n, K] priors to use instead of drawing them (e.g.
      the train split's, from `dirichlet_class_priors`).

  Returns:
    n disjoint index arrays, each of length floor(N / n), in take order.

  Example:
    >>> labels = np.repeat(np.arange(10), 100)
    >>> [len(p) for p in balanced_dirichlet(labels, 3, alpha=0.1, seed=0)]
    [333, 333, 333]
  """
  labels, k = _labels(labels, num_classes)
  n_total = labels.size
  _check_num_clients(num_clients, n_total)
  prior_rng, rng = _prior_and_sampling_rngs(seed)
  if class_priors is None:
    _check_alpha(alpha)
    priors = _draw_priors(prior_rng, num_clients, k, alpha)
  else:
    priors = np.asarray(class_priors, np.float64)
    if priors.shape != (num_clients, k):
      raise ValueError(f"class_priors must have shape (num_clients, num_classes) = "
                       f"{(num_clients, k)}, got {priors.shape}")
    if (priors < 0).any() or not np.allclose(priors.sum(1), 1.0, atol=1e-6):
      raise ValueError("class_priors rows must be non-negative and sum to 1")
  m = n_total // num_clients
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(k)]
  supply = np.array([p.size for p in pools], np.int64)

  clients_T = _client_order(rng, num_clients, m)
  avail = supply > 0
  classes_T = _draw_categorical(rng, priors, clients_T, avail)
  for _ in range(k + 1):
    rank = _rank_within_group(classes_T, k)
    over = rank >= supply[classes_T]
    if not over.any():
      break
    t_star = int(np.argmax(over))
    c_star = classes_T[t_star]
    avail[c_star] = False
    redo = over & (classes_T == c_star)  # all at t >= t_star
    classes_T[redo] = _draw_categorical(rng, priors, clients_T[redo], avail)
  else:  # pragma: no cover - each pass exhausts one more class
    raise AssertionError("balanced_dirichlet did not converge")

  rank = _rank_within_group(classes_T, k)
  starts = np.concatenate([[0], np.cumsum(supply)[:-1]])
  flat_pool = np.concatenate(pools).astype(np.int64)
  taken_T = flat_pool[starts[classes_T] + rank]
  order = np.argsort(clients_T, kind="stable")  # per client, in take order
  return np.split(taken_T[order], np.arange(1, num_clients) * m)


def balanced_dirichlet_train_test(train_labels, test_labels, num_clients: int, alpha: float,
                                  seed: int, *, share_priors: bool = False,
                                  num_classes: int | None = None) -> tuple[Parts, Parts]:
  """Balanced Dirichlet on the train split and, separately, on the test split.

  Gives each client a local test set (FIARSE: 100 CIFAR test images each); the
  union of the test parts is the global test set (all of it when n divides N).

  Args:
    train_labels: [N_train] class ids.
    test_labels: [N_test] class ids.
    num_clients: n.
    alpha: concentration, > 0.
    seed: integer seed; the train parts equal `balanced_dirichlet(train_labels,
      num_clients, alpha, seed)`, the test split uses the stream `[seed, 1]`.
    share_priors: reuse each client's train prior p_i for its test set (a
      client's test labels then follow its train labels). False (default) draws
      independent test priors, as FIARSE's code does.
    num_classes: K (default: from the larger label of both splits).

  Returns:
    (train_parts, test_parts).
  """
  if num_classes is None:
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
  train = balanced_dirichlet(train_labels, num_clients, alpha, seed, num_classes=num_classes)
  # The priors the train call above drew.
  priors = dirichlet_class_priors(num_clients, num_classes, alpha, seed) if share_priors else None
  test = balanced_dirichlet(test_labels, num_clients, alpha, [seed, 1], num_classes=num_classes,
                            class_priors=priors)
  return train, test


def shards(labels, num_clients: int, classes_per_client: int, seed: int) -> Parts:
  """Pathological label skew: every client holds exactly k distinct classes.

  McMahan et al.'s shards (sort by label, deal 2 shards per client) give *at most*
  k classes (a shard can straddle two classes, two shards can share one). This
  variant makes it exact: classes are placed on a random cyclic order and
  client i gets the k consecutive classes starting at position i*k (mod K), so
  each class is held by floor(n*k/K) or ceil(n*k/K) clients; each class's
  shuffled examples are then cut evenly among its holders. Clients are
  returned in a random order.

  Args:
    labels: [N] integer class ids (classes = the distinct labels present).
    num_clients: n, 1 <= n <= N.
    classes_per_client: k, 1 <= k <= number of distinct labels.
    seed: integer seed.

  Returns:
    n disjoint index arrays, each shuffled, each with exactly k distinct
    labels; they cover every example when n * k >= K (otherwise the classes
    nobody holds are left out).
  """
  labels, _ = _labels(labels)
  _check_num_clients(num_clients, labels.size)
  present = np.unique(labels)
  k_total = present.size
  if int(classes_per_client) != classes_per_client or not 1 <= classes_per_client <= k_total:
    raise ValueError(f"classes_per_client must be an integer in [1, {k_total}] (the number of "
                     f"distinct labels), got {classes_per_client!r}")
  k = int(classes_per_client)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(present)
  slots = perm[(np.arange(num_clients * k)) % k_total].reshape(num_clients, k)
  holders = [np.flatnonzero((slots == c).any(1)) for c in present]
  chunks = [[] for _ in range(num_clients)]
  for c, who in zip(present, holders):
    if who.size == 0:  # n * k < K: nobody holds this class
      continue
    idx_c = rng.permutation(np.flatnonzero(labels == c))
    if idx_c.size < who.size:
      raise ValueError(f"class {c} has {idx_c.size} examples but {who.size} clients must hold it; "
                       f"lower num_clients or classes_per_client")
    for i, piece in zip(who, np.array_split(idx_c, who.size)):
      chunks[i].append(piece)
  client_order = rng.permutation(num_clients)
  return [rng.permutation(np.concatenate(chunks[i])) for i in client_order]
