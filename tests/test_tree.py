"""fedjax_prune.tree: the pytree arithmetic the engine's round metrics rely on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import tree as tree_lib


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_all_finite_finds_one_bad_entry_in_any_leaf(bad, dtype):
  tree = {"a": jnp.ones((3, 4), dtype), "b": {"c": jnp.arange(5, dtype=dtype)},
          "steps": jnp.arange(3), "flag": jnp.ones((), bool)}
  assert bool(jax.jit(tree_lib.all_finite)(tree))
  for path in (("a",), ("b", "c")):
    leaf = tree[path[0]] if len(path) == 1 else tree["b"]["c"]
    broken = leaf.reshape(-1).at[-1].set(bad).reshape(leaf.shape)
    changed = {**tree, "a": broken} if path == ("a",) else {**tree, "b": {"c": broken}}
    assert not bool(jax.jit(tree_lib.all_finite)(changed)), (path, bad)


def test_all_finite_does_not_overflow_on_huge_finite_values():
  huge = jnp.full((1000,), jnp.finfo(jnp.float32).max)
  assert bool(jax.jit(tree_lib.all_finite)({"w": huge, "v": -huge}))
  assert bool(tree_lib.all_finite({}))  # nothing to check
  assert bool(tree_lib.all_finite({"n": jnp.arange(3)}))  # integer leaves are always finite


def test_squared_norm_is_the_sum_over_leaves():
  tree = {"a": jnp.asarray([[3.0, 4.0]]), "b": jnp.asarray([12.0])}
  np.testing.assert_allclose(tree_lib.squared_norm(tree), 9 + 16 + 144)
