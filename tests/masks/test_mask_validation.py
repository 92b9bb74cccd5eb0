"""Input validation of mask counting and `apply`: bad masks raise errors naming the leaf."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import masks

DENSE = {"w": jnp.ones((72, 16)), "b": jnp.ones(16)}


def _masks(w):
  return {"w": w, "b": jnp.ones((), bool)}


BAD_SHAPES = [
    jnp.ones((16, 392), bool),  # same size class, wrong dims: used to give density 0.0137
    jnp.ones((3, 3), bool),  # used to give density 1.0
    jnp.ones((1, 1, 16), bool),  # rank 3 mask on a rank 2 param
    jnp.ones((16,), bool),  # rank 1 mask on a rank 2 param
]


@pytest.mark.parametrize("bad", BAD_SHAPES, ids=lambda m: str(m.shape))
@pytest.mark.parametrize("fn", [masks.density, masks.count_kept, masks.sparsity,
                                masks.layer_densities])
def test_counting_rejects_masks_that_do_not_fit_params(fn, bad):
  with pytest.raises(ValueError, match=r"mask leaf 'w' with shape .*not broadcastable.*\(72, 16\)"):
    fn(_masks(bad), DENSE)


def test_counting_rejects_non_bool_and_missing_leaves():
  with pytest.raises(ValueError, match=r"'w'.*dtype bool"):
    masks.density(_masks(jnp.ones((72, 16), jnp.float32)), DENSE)
  with pytest.raises(ValueError, match=r"missing leaves: \['b'\]"):
    masks.count_kept({"w": jnp.ones((72, 16), bool)}, DENSE)


def test_counting_still_accepts_valid_broadcast_masks_and_shape_structs():
  shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), DENSE)
  channel = jnp.zeros((1, 16), bool).at[0, :4].set(True)
  for params in (DENSE, shapes):
    assert int(masks.count_kept(_masks(channel), params)) == 4 * 72 + 16
  np.testing.assert_allclose(masks.density(_masks(channel), DENSE), (4 * 72 + 16) / (72 * 16 + 16))
  np.testing.assert_allclose(masks.layer_densities(_masks(channel), DENSE)["w"], 0.25)
  # Under jit the checks are static: traced masks are validated too.
  got = jax.jit(lambda m: masks.density(m, DENSE))(_masks(channel))
  np.testing.assert_allclose(got, (4 * 72 + 16) / (72 * 16 + 16))


@pytest.mark.parametrize("fn", [masks.apply, masks.mask_gradients, masks.project])
def test_apply_wrong_shape_names_leaf(fn):
  with pytest.raises(ValueError, match=r"mask leaf 'w' with shape \(3, 3\).*\(72, 16\)"):
    fn(DENSE, _masks(jnp.ones((3, 3), bool)))


def test_apply_missing_subtree_names_leaf(params):
  m = masks.ones_like(params)
  del m["dense_0"]
  with pytest.raises(ValueError, match=r"missing leaves: \['dense_0/bias', 'dense_0/kernel'\]"):
    masks.apply(params, m)


@pytest.mark.parametrize("bad", [jnp.full((72, 16), 0.5), jnp.ones((72, 16), jnp.int32),
                                 np.full((), 0.5, np.float32)])
def test_apply_rejects_non_bool_masks(bad):
  with pytest.raises(TypeError, match=r"mask leaf 'w' must have dtype bool"):
    masks.apply(DENSE, _masks(bad))


def test_apply_checks_traced_masks_under_jit_statically():
  good = _masks(jnp.ones((1, 16), bool).at[0, 0].set(False))
  out = jax.jit(masks.apply)(DENSE, good)
  assert float(jnp.sum(out["w"])) == 72 * 15
  with pytest.raises(ValueError, match=r"mask leaf 'w'"):
    jax.jit(masks.apply)(DENSE, _masks(jnp.ones((3, 3), bool)))
  with pytest.raises(TypeError, match=r"mask leaf 'w'.*dtype bool"):
    jax.jit(masks.apply)(DENSE, _masks(jnp.full((72, 16), 0.5)))
