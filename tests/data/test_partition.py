"""Partitioner properties: disjoint, complete, sizes, label skew trends, seeds."""
import numpy as np
import pytest

from fedjax_prune import data


def _labels(num_classes=10, per_class=300, seed=0):
  y = np.repeat(np.arange(num_classes), per_class)
  return np.random.default_rng(seed).permutation(y)


def _assert_disjoint(parts, n_total, complete=True):
  allidx = np.concatenate(parts)
  assert allidx.dtype.kind == "i"
  assert np.unique(allidx).size == allidx.size, "an example is in two clients"
  assert allidx.min() >= 0 and allidx.max() < n_total
  if complete:
    assert allidx.size == n_total, "not every example was assigned"


def _skew(labels, parts, k):
  """(mean TV distance of client label dists to global, mean #classes per client)."""
  counts = data.partition_class_counts(labels, parts, k).astype(float)
  counts = counts[counts.sum(1) > 0]
  dist = counts / counts.sum(1, keepdims=True)
  glob = np.bincount(labels, minlength=k) / labels.size
  tv = 0.5 * np.abs(dist - glob[None, :]).sum(1).mean()
  return tv, (counts > 0).sum(1).mean()


def test_natural_groups_by_id_in_sorted_order():
  ids = np.array(["b", "a", "b", "c", "a", "b"])
  parts = data.natural(ids)
  assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
  _assert_disjoint(parts, ids.size)


def test_iid_sizes_and_cover():
  parts = data.iid(103, 10, seed=0)
  assert len(parts) == 10
  assert {len(p) for p in parts} <= {10, 11}
  _assert_disjoint(parts, 103)


def test_size_skew():
  parts = data.size_skew(2000, 20, sigma=1.5, seed=0)
  sizes = np.array([len(p) for p in parts])
  _assert_disjoint(parts, 2000)
  assert sizes.min() >= 1
  assert sizes.max() / sizes.min() > 5  # log-normal sizes are skewed
  even = np.array([len(p) for p in data.size_skew(2000, 20, sigma=0.0, seed=0)])
  assert even.max() - even.min() <= 1


@pytest.mark.parametrize("min_size", [0, 10])
def test_dirichlet_cover_and_min_size(min_size):
  y = _labels()
  parts = data.dirichlet(y, 20, 0.5, seed=1, min_size=min_size)
  assert len(parts) == 20
  _assert_disjoint(parts, y.size)
  assert min(len(p) for p in parts) >= min_size


def test_dirichlet_alpha_trend():
  y = _labels()
  stats = [_skew(y, data.dirichlet(y, 10, a, seed=0, min_size=1), 10) for a in (0.01, 1.0, 1000.0)]
  tvs, ncls = zip(*stats)
  assert tvs[0] > tvs[1] > tvs[2]
  assert ncls[0] < ncls[1] < ncls[2]
  assert tvs[2] < 0.05 and ncls[2] == 10  # ~IID
  assert ncls[0] < 2.5                   # ~one class per client


def test_dirichlet_impossible_min_size():
  y = _labels()
  with pytest.raises(ValueError, match="min_size"):
    data.dirichlet(y, 10, 1.0, seed=0, min_size=301)
  # Possible in principle but (almost) never drawn: a clear error, no hang.
  with pytest.raises(ValueError, match="max_retries"):
    data.dirichlet(y, 100, 0.001, seed=0, min_size=30, max_retries=3)


@pytest.mark.parametrize("alpha", [0.01, 0.3, 100.0])
def test_balanced_dirichlet_exact_sizes(alpha):
  y = _labels(per_class=101)  # N = 1010, not divisible by 7
  parts = data.balanced_dirichlet(y, 7, alpha, seed=0)
  assert [len(p) for p in parts] == [1010 // 7] * 7
  _assert_disjoint(parts, y.size, complete=False)


def test_balanced_dirichlet_unbalanced_classes_exhaust():
  # Class 0 is rare: clients that prefer it must re-draw once it runs out.
  y = np.concatenate([np.zeros(5, int), np.ones(200, int), np.full(195, 2)])
  priors = np.array([[0.9, 0.05, 0.05]] * 4)
  parts = data.balanced_dirichlet(y, 4, 1.0, seed=0, class_priors=priors)
  assert [len(p) for p in parts] == [100] * 4
  _assert_disjoint(parts, y.size)
  counts = data.partition_class_counts(y, parts, 3)
  assert counts[:, 0].sum() == 5


def test_balanced_dirichlet_alpha_trend():
  y = _labels()
  stats = [_skew(y, data.balanced_dirichlet(y, 10, a, seed=0), 10) for a in (0.01, 1.0, 1000.0)]
  tvs, ncls = zip(*stats)
  assert tvs[0] > tvs[1] > tvs[2]
  assert ncls[0] < ncls[1] <= ncls[2]
  assert tvs[2] < 0.1


def _reference_balanced_dirichlet(labels, priors, m, rng):
  """FedLab/FIARSE's sequential loop, for a distributional comparison."""
  n, k = priors.shape
  remaining = np.full(n, m)
  left = np.bincount(labels, minlength=k)
  counts = np.zeros((n, k), int)
  cdf = np.cumsum(priors, axis=1)
  while remaining.sum():
    i = rng.integers(n)
    if remaining[i] == 0:
      continue
    remaining[i] -= 1
    while True:
      c = min(int(np.searchsorted(cdf[i], rng.random(), side="right")), k - 1)
      if left[c] > 0:
        break
    left[c] -= 1
    counts[i, c] += 1
  return counts


def test_balanced_dirichlet_matches_sequential_reference_in_law():
  # Tight supply (class 0 runs out) so the re-draw logic matters.
  y = np.concatenate([np.zeros(6, int), np.ones(10, int), np.full(14, 2)])
  # Client 0 strongly prefers the rare class 0; once it is gone it must re-draw
  # from its prior restricted to {1, 2} (~[0.95, 0.05]), not e.g. uniformly.
  priors = np.array([[0.8, 0.19, 0.01], [0.1, 0.1, 0.8], [0.45, 0.45, 0.1]])
  m, trials = 10, 1000
  ref_rng = np.random.default_rng(123)
  ref = np.mean([_reference_balanced_dirichlet(y, priors, m, ref_rng) for _ in range(trials)], 0)
  ours = np.mean([data.partition_class_counts(
      y, data.balanced_dirichlet(y, 3, 1.0, seed=s, class_priors=priors), 3)
                  for s in range(trials)], 0)
  # Per-cell counts have std <= ~2; the difference of two 1000-trial means has
  # std <= ~0.09. A uniform re-draw after exhaustion is off by ~0.75.
  np.testing.assert_allclose(ours, ref, atol=0.35)


def test_balanced_dirichlet_train_test_share_priors():
  y_tr, y_te = _labels(per_class=200), _labels(per_class=40, seed=1)
  tr, te = data.balanced_dirichlet_train_test(y_tr, y_te, 10, 0.05, seed=0)
  assert [len(p) for p in te] == [40] * 10
  assert all(np.array_equal(a, b) for a, b in zip(tr, data.balanced_dirichlet(y_tr, 10, 0.05, seed=0)))
  _, te_shared = data.balanced_dirichlet_train_test(y_tr, y_te, 10, 0.05, seed=0, share_priors=True)
  c_tr = data.partition_class_counts(y_tr, tr, 10)
  dist_tr = c_tr / c_tr.sum(1, keepdims=True)
  def tv_to_train(parts):
    c = data.partition_class_counts(y_te, parts, 10)
    return 0.5 * np.abs(c / c.sum(1, keepdims=True) - dist_tr).sum(1).mean()
  assert tv_to_train(te_shared) < 0.3 < tv_to_train(te)


def test_dirichlet_class_priors_reproduce_balanced_dirichlet():
  y = _labels()
  priors = data.dirichlet_class_priors(6, 10, 0.3, seed=4)
  assert priors.shape == (6, 10)
  np.testing.assert_allclose(priors.sum(1), 1.0)
  a = data.balanced_dirichlet(y, 6, 0.3, seed=4)
  b = data.balanced_dirichlet(y, 6, 123.0, seed=4, class_priors=priors)  # alpha unused
  assert all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_shards_exact_classes(k):
  y = _labels()
  parts = data.shards(y, 20, k, seed=0)
  counts = data.partition_class_counts(y, parts, 10)
  assert ((counts > 0).sum(1) == k).all()
  _assert_disjoint(parts, y.size)
  holders = (counts > 0).sum(0)
  assert holders.max() - holders.min() <= 1  # classes spread evenly


def test_shards_fewer_slots_than_classes():
  y = _labels()
  parts = data.shards(y, 3, 2, seed=0)  # 6 of 10 classes held
  counts = data.partition_class_counts(y, parts, 10)
  assert ((counts > 0).sum(1) == 2).all()
  _assert_disjoint(parts, y.size, complete=False)
  assert np.concatenate(parts).size == 6 * 300


PARTITIONERS = {
    "iid": lambda y, s: data.iid(y.size, 8, s),
    "size_skew": lambda y, s: data.size_skew(y.size, 8, 1.0, s),
    "dirichlet": lambda y, s: data.dirichlet(y, 8, 0.3, s),
    "balanced_dirichlet": lambda y, s: data.balanced_dirichlet(y, 8, 0.3, s),
    "shards": lambda y, s: data.shards(y, 8, 2, s),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_deterministic_in_seed(name):
  y = _labels()
  fn = PARTITIONERS[name]
  a, b, c = fn(y, 0), fn(y, 0), fn(y, 1)
  assert all(np.array_equal(u, v) for u, v in zip(a, b))
  assert not all(np.array_equal(u, v) for u, v in zip(a, c))


def test_partition_arrays_roundtrip():
  y = _labels(per_class=20)
  x = np.arange(y.size, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  parts = data.dirichlet(y, 5, 0.5, seed=0, min_size=1)
  cd = data.partition_arrays(x, y, parts)
  assert cd.num_examples.tolist() == [len(p) for p in parts]
  assert cd.x.shape == (5, max(len(p) for p in parts), 3)
  for i, p in enumerate(parts):
    np.testing.assert_array_equal(cd.x[i, :len(p), 0], p.astype(np.float32))
    np.testing.assert_array_equal(cd.y[i, :len(p)], y[p])


@pytest.mark.parametrize("call, match", [
    (lambda y: data.dirichlet(y, 5, 0.0, seed=0), "alpha"),
    (lambda y: data.dirichlet(y, 5, -1.0, seed=0), "alpha"),
    (lambda y: data.balanced_dirichlet(y, 5, 0.0, seed=0), "alpha"),
    (lambda y: data.iid(y.size, 0, seed=0), "num_clients"),
    (lambda y: data.iid(10, 11, seed=0), "num_clients"),
    (lambda y: data.dirichlet(y, -2, 1.0, seed=0), "num_clients"),
    (lambda y: data.balanced_dirichlet(y, y.size + 1, 1.0, seed=0), "num_clients"),
    (lambda y: data.shards(y, 5, 11, seed=0), "classes_per_client"),
    (lambda y: data.shards(y, 5, 0, seed=0), "classes_per_client"),
    (lambda y: data.size_skew(y.size, 5, -1.0, seed=0), "sigma"),
    (lambda y: data.dirichlet(y.astype(float), 5, 1.0, seed=0), "integers"),
    (lambda y: data.balanced_dirichlet(y, 5, 1.0, seed=0, class_priors=np.ones((5, 3))), "class_priors"),
])
def test_validation_errors_name_the_problem(call, match):
  with pytest.raises(ValueError, match=match):
    call(_labels(per_class=30))
