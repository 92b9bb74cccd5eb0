"""Client samplers: distinct ids, determinism per (seed, round), padding."""
import numpy as np
import pytest

from fedjax_prune import data


def test_uniform_distinct_sorted_in_range():
  ids = data.uniform(100, 10, seed=0, round_idx=3)
  assert ids.dtype == np.int32 and ids.shape == (10,)
  assert np.unique(ids).size == 10 and (np.diff(ids) > 0).all()
  assert ids.min() >= 0 and ids.max() < 100


def test_uniform_deterministic_per_round_and_rounds_differ():
  a = data.uniform(1000, 20, seed=7, round_idx=5)
  np.testing.assert_array_equal(a, data.uniform(1000, 20, seed=7, round_idx=5))
  assert not np.array_equal(a, data.uniform(1000, 20, seed=7, round_idx=6))
  assert not np.array_equal(a, data.uniform(1000, 20, seed=8, round_idx=5))


def test_uniform_is_uniform():
  hits = np.bincount(np.concatenate([data.uniform(10, 3, seed=0, round_idx=r) for r in range(3000)]),
                     minlength=10)
  # Each client is drawn with probability 0.3 per round: 900 +- 25.
  assert np.abs(hits - 900).max() < 5 * 25


def test_full_cohort_is_everyone():
  np.testing.assert_array_equal(data.uniform(5, 5, seed=0, round_idx=0), np.arange(5))


def test_proportional_prefers_large_clients_and_skips_empty():
  sizes = np.array([0, 1, 1, 1, 100, 100])
  draws = np.concatenate([data.proportional(sizes, 2, seed=1, round_idx=r) for r in range(500)])
  hits = np.bincount(draws, minlength=6)
  assert hits[0] == 0
  assert hits[4] > 450 and hits[5] > 450
  a = data.proportional(sizes, 3, seed=1, round_idx=2)
  assert np.unique(a).size == 3
  np.testing.assert_array_equal(a, data.proportional(sizes, 3, seed=1, round_idx=2))


def test_fixed_schedule():
  sample = data.fixed_schedule([[3, 1], [0, 2, 4]])
  np.testing.assert_array_equal(sample(0), [3, 1])
  np.testing.assert_array_equal(sample(1), [0, 2, 4])
  with pytest.raises(IndexError, match="cycle"):
    sample(2)
  np.testing.assert_array_equal(data.fixed_schedule([[3, 1], [0]], cycle=True)(4), [3, 1])


def test_pad_cohort():
  ids, active = data.pad_cohort(np.array([5, 2, 9]), 4)
  np.testing.assert_array_equal(ids, [5, 2, 9, 5])
  np.testing.assert_array_equal(active, [True, True, True, False])
  assert ids.dtype == np.int32 and active.dtype == bool
  ids, active = data.pad_cohort([1, 2, 3, 4], 4)
  assert ids.shape == (4,) and active.all()
  ids, active = data.pad_cohort([7], 8)
  assert ids.shape == (8,) and (ids == 7).all() and active.sum() == 1


@pytest.mark.parametrize("call, match", [
    (lambda: data.uniform(10, 11, seed=0, round_idx=0), "cohort_size"),
    (lambda: data.uniform(10, 0, seed=0, round_idx=0), "cohort_size"),
    (lambda: data.uniform(0, 1, seed=0, round_idx=0), "num_clients"),
    (lambda: data.uniform(10, 2, seed=-1, round_idx=0), "seed"),
    (lambda: data.uniform(10, 2, seed=0, round_idx=-1), "round_idx"),
    (lambda: data.proportional([0, 0, 5], 2, seed=0, round_idx=0), "cohort_size"),
    (lambda: data.proportional([1, -1], 1, seed=0, round_idx=0), "num_examples"),
    (lambda: data.pad_cohort([1], 0), "multiple"),
    (lambda: data.pad_cohort([], 2), "client_ids"),
    (lambda: data.fixed_schedule([]), "schedule"),
])
def test_validation(call, match):
  with pytest.raises(ValueError, match=match):
    call()
