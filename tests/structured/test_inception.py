"""The ASP Inception-style model: exact parameter and FLOP counts of the paper's code."""
import jax
import jax.numpy as jnp
import pytest

from fedjax_prune import accounting, models


def test_femnist_and_celeba_counts_match_the_paper():
  femnist = models.asp_inception()
  celeba = models.asp_inception(num_classes=2, input_shape=(84, 84, 3))
  assert accounting.param_count(femnist) == 246_236     # METHODS.md §1.4
  assert accounting.param_count(celeba) == 243_752      # METHODS.md §1.6
  assert accounting.flops(femnist) == 31_010_894
  assert accounting.flops(celeba) == 324_044_726


def test_builds_and_runs():
  spec = models.asp_inception(widths=(4, 2, 3, 2, 3, 2, 4, 5, 6), dense_width=7)
  apply_fn, params, stats = models.build(spec, jax.random.key(0))
  assert params["inception1"]["conv5x5"]["kernel"].shape == (5, 5, 7, 4)
  assert params["conv_0"]["kernel"].shape == (3, 3, 9, 5)
  logits, _ = jax.jit(lambda p, x: apply_fn(p, stats, x, train=True))(params, jnp.ones((2, 28, 28, 1)))
  assert logits.shape == (2, 62)


def test_bad_widths_are_named():
  with pytest.raises(ValueError, match="asp_inception widths"):
    models.asp_inception(widths=(4, 2, 3))
  with pytest.raises(ValueError, match="collapses"):
    models.asp_inception(input_shape=(8, 8, 1))
