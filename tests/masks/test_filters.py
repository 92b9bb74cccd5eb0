"""Tests for masks._filters: static prunable-leaf trees."""
import jax
import jax.numpy as jnp
import pytest

from fedjax_prune import masks


def test_by_ndim_selects_kernels_only(params):
  f = masks.by_ndim(params)
  assert f == {
      "conv_0": {"kernel": True, "bias": False},
      "bn_0": {"scale": False, "bias": False},
      "dense_0": {"kernel": True, "bias": False},
  }
  assert all(isinstance(b, bool) for b in jax.tree.leaves(f))
  assert all(jax.tree.leaves(masks.by_ndim(params, min_ndim=1)))
  assert masks.by_ndim(params, min_ndim=4)["dense_0"]["kernel"] is False
  with pytest.raises(ValueError, match="min_ndim"):
    masks.by_ndim(params, min_ndim=-1)


def test_by_path_regex_uses_slash_paths(params):
  f = masks.by_path_regex(params, r"kernel$")
  assert f["conv_0"]["kernel"] and f["dense_0"]["kernel"]
  assert not f["conv_0"]["bias"] and not f["bn_0"]["scale"]
  g = masks.by_path_regex(params, r"^conv_0/")
  assert g["conv_0"]["kernel"] and g["conv_0"]["bias"] and not g["dense_0"]["kernel"]


def test_combine_and_invert(params):
  kernels = masks.by_ndim(params)
  conv = masks.by_path_regex(params, r"^conv_")
  both = masks.combine(kernels, conv)
  either = masks.combine(kernels, conv, reduce_fn=any)
  assert both["conv_0"]["kernel"] and not both["conv_0"]["bias"] and not both["dense_0"]["kernel"]
  assert either["conv_0"]["bias"] and either["dense_0"]["kernel"] and not either["bn_0"]["scale"]
  inv = masks.invert(kernels)
  assert inv["conv_0"]["bias"] and not inv["conv_0"]["kernel"]
  with pytest.raises(ValueError, match="at least one"):
    masks.combine()


def test_traced_prunable_flag_is_rejected(params):
  scores = masks.magnitude(params)
  bad = jax.tree.map(lambda _: jnp.array(True), params)
  with pytest.raises(ValueError, match=r"prunable\['bn_0/bias'\].*Python bool"):
    masks.topk(scores, 0.5, bad)
