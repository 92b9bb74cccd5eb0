"""make_evaluate_pooled_clients: one pass over the pooled test set gives the central sums of
make_evaluate (bit for bit) and the per-client counts of make_evaluate_clients (exactly)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_prune import data as data_lib
from fedjax_prune import federated


def _mlp(params, batch_stats, x, train=False, example_mask=None):
  return jnp.tanh(x @ params["w1"]) @ params["w2"], batch_stats


def _setting(counts=(5, 0, 9, 1, 3), dim=6, classes=4, seed=0):
  """Clients with `counts` local test examples (one empty), an untrained 2-layer MLP."""
  rng = np.random.default_rng(seed)
  xs = [rng.normal(size=(n, dim)).astype(np.float32) for n in counts]
  ys = [rng.integers(0, classes, n).astype(np.int32) for n in counts]
  clients = data_lib.to_device(data_lib.from_client_lists(xs, ys, allow_empty=True))
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w1": jax.random.normal(k1, (dim, 8)), "w2": jax.random.normal(k2, (8, classes))}
  x, y = data_lib.pool(clients)
  ids = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
  return params, clients, jnp.asarray(x), jnp.asarray(y), jnp.asarray(ids)


@pytest.mark.parametrize("batch_size", [7, 64])  # 18 rows: a padded last batch; one batch
def test_pooled_equals_central_and_per_client(batch_size):
  params, clients, x, y, ids = _setting()
  pooled = jax.jit(federated.make_evaluate_pooled_clients(_mlp, batch_size=batch_size),
                   static_argnames="num_clients")
  central, local = pooled(params, None, x, y, ids, num_clients=5)
  want_central = jax.jit(federated.make_evaluate(_mlp, batch_size=batch_size))(params, None, x, y)
  for got, want in zip(central, want_central):  # the same sums, added in the same order
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  want_local = federated.make_evaluate_clients(_mlp, batch_size=3, clients_per_chunk=2)(
      params, None, clients)
  np.testing.assert_array_equal(local.num_examples, [5, 0, 9, 1, 3])
  np.testing.assert_array_equal(local.correct_sum, want_local.correct_sum)
  np.testing.assert_allclose(local.loss_sum, want_local.loss_sum, rtol=1e-6)
  # Hand check: client 2's hits are its rows' argmax hits.
  logits = np.asarray(_mlp(params, None, x)[0])
  rows = np.asarray(ids) == 2
  assert float(local.correct_sum[2]) == float(np.sum(logits[rows].argmax(-1) == np.asarray(y)[rows]))
  assert float(local.correct_sum[2]) > 0  # the check above is not 0 == 0


def test_pooled_with_no_rows_gives_zero_sums():
  ev = federated.make_evaluate_pooled_clients(_mlp, batch_size=4)
  params, *_ = _setting()
  central, local = ev(params, None, jnp.zeros((0, 6)), jnp.zeros((0,), jnp.int32),
                      jnp.zeros((0,), jnp.int32), num_clients=3)
  assert float(central.num_examples) == 0 and local.num_examples.shape == (3,)
  assert float(jnp.sum(local.num_examples)) == 0


def test_pooled_rejects_ids_of_another_length():
  params, _, x, y, ids = _setting()
  ev = federated.make_evaluate_pooled_clients(_mlp, batch_size=4)
  with pytest.raises(ValueError, match=r"client_ids must have shape \[M\] = \(18,\)"):
    ev(params, None, x, y, ids[:-1], num_clients=5)
  with pytest.raises(ValueError, match=r"eval batch_size must be"):
    federated.make_evaluate_pooled_clients(_mlp, batch_size=0)
