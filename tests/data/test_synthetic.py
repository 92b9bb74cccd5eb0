"""Synthetic datasets: shapes, determinism, heterogeneity, speed, learnability."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_prune import data


def _pool(d, clients=slice(None)):
  mask = np.arange(d.x.shape[1])[None, :] < np.asarray(d.num_examples)[clients, None]
  return d.x[clients][mask], d.y[clients][mask]


def _fit_linear(x, y, num_classes, steps, lr=3e-3, batch=64):
  """Multinomial logistic regression with Adam; returns predict(x)."""
  x = x.reshape(len(x), -1).astype(np.float32)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  opt = optax.adam(lr)
  logits = lambda p, x: x @ p["w"] + p["b"][None, :]  # noqa: E731

  @jax.jit
  def step(p, s, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, xb), yb).mean()  # noqa: E731
    u, s = opt.update(jax.grad(loss)(p), s)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch)
    params, state = step(params, state, x[idx], y[idx])
  return lambda xe: np.asarray(jnp.argmax(logits(params, xe.reshape(len(xe), -1).astype(np.float32)), 1))


def test_images_shapes_and_dtypes():
  tr, te = data.synthetic_images(5, seed=0, examples_per_client=(10, 20), test_examples_per_client=7)
  assert tr.x.shape[0] == 5 and tr.x.shape[2:] == (28, 28, 1) and tr.x.dtype == np.uint8
  assert tr.y.dtype == np.int32 and tr.y.shape == tr.x.shape[:2]
  assert ((tr.num_examples >= 10) & (tr.num_examples <= 20)).all()
  assert te.num_examples.tolist() == [7] * 5 and te.x.shape[1] == 7
  x, y = _pool(tr)
  assert y.min() >= 0 and y.max() < 10
  assert x.max() > 200 and x.min() < 30  # ink and background both present
  tr3, _ = data.synthetic_images(3, seed=0, image_shape=(32, 32, 3), examples_per_client=4,
                                 dtype=np.float32, num_classes=62)
  assert tr3.x.shape == (3, 4, 32, 32, 3) and tr3.x.dtype == np.float32
  assert 0.0 <= tr3.x.min() and tr3.x.max() <= 1.0


def test_images_deterministic_in_seed():
  a, at = data.synthetic_images(4, seed=3, examples_per_client=(5, 9))
  b, bt = data.synthetic_images(4, seed=3, examples_per_client=(5, 9))
  c, _ = data.synthetic_images(4, seed=4, examples_per_client=(5, 9))
  for u, v in zip(a + at, b + bt):
    np.testing.assert_array_equal(u, v)
  assert a.x.shape != c.x.shape or not np.array_equal(a.x, c.x)


def test_images_label_skew():
  def mean_tv(alpha):
    tr, _ = data.synthetic_images(40, seed=0, examples_per_client=50, label_skew_alpha=alpha)
    counts = np.stack([np.bincount(tr.y[i, :n], minlength=10) for i, n in enumerate(tr.num_examples)])
    dist = counts / counts.sum(1, keepdims=True)
    glob = counts.sum(0) / counts.sum()
    return 0.5 * np.abs(dist - glob[None, :]).sum(1).mean()
  assert mean_tv(0.1) > 0.5 > 0.2 > mean_tv(None)


def test_images_writer_effect():
  # Per-client mean brightness varies across writers far more with distortion on.
  def spread(wd):
    tr, _ = data.synthetic_images(30, seed=1, examples_per_client=40, label_skew_alpha=None,
                                  writer_distortion=wd, noise=0.0)
    return np.std(tr.x.reshape(30, -1).mean(1))
  assert spread(1.0) > 3 * spread(0.0)


def test_images_size_model():
  tr, _ = data.synthetic_images(50, seed=0, examples_per_client=(5, 500), size_sigma=1.0)
  n = tr.num_examples
  assert n.min() >= 5 and n.max() <= 500 and n.max() / n.min() > 5


def test_images_fast():
  start = time.perf_counter()
  data.synthetic_images(100, seed=0, examples_per_client=100)
  assert time.perf_counter() - start < 3.0  # ~0.4 s on 2 CPU cores


def test_images_learnable_but_not_trivial():
  tr, te = data.synthetic_images(50, seed=0, examples_per_client=80)
  x, y = _pool(tr, slice(0, 40))
  predict = _fit_linear(x.astype(np.float32) / 255.0, y, 10, steps=300)
  xt, yt = _pool(te, slice(0, 40))     # same writers, held-out examples
  xh, yh = _pool(tr, slice(40, 50))    # unseen writers
  acc_test = (predict(xt.astype(np.float32) / 255.0) == yt).mean()
  acc_new = (predict(xh.astype(np.float32) / 255.0) == yh).mean()
  assert acc_test > 0.3 and acc_new > 0.3  # > 3x chance (0.1)
  assert acc_test < 0.95                   # a linear model does not solve it


def test_images_validation():
  with pytest.raises(ValueError, match="examples_per_client"):
    data.synthetic_images(3, seed=0, examples_per_client=(5, 2))
  with pytest.raises(ValueError, match="label_skew_alpha"):
    data.synthetic_images(3, seed=0, label_skew_alpha=0.0)
  with pytest.raises(ValueError, match="num_clients"):
    data.synthetic_images(0, seed=0)
  with pytest.raises(ValueError, match="image_shape"):
    data.synthetic_images(2, seed=0, image_shape=(28, 28))


def test_fedprox_statistics():
  tr, te = data.synthetic_fedprox(1.0, 1.0, seed=0)
  n_total = tr.num_examples + te.num_examples
  assert tr.x.shape[0] == 30 and tr.x.shape[2] == 60 and tr.x.dtype == np.float32
  assert (n_total >= 50).all()
  np.testing.assert_array_equal(tr.num_examples, (0.9 * n_total).astype(int))
  assert tr.y.min() >= 0 and tr.y.max() < 10
  # Within-client covariance is diagonal j^-1.2 (check on the largest client).
  i = int(np.argmax(tr.num_examples))
  xi = tr.x[i, :tr.num_examples[i]]
  assert len(xi) > 300
  ratio = xi.var(0) / np.arange(1, 61) ** -1.2
  assert 0.7 < np.median(ratio) < 1.3


def test_fedprox_heterogeneity_and_iid():
  def client_means(**kw):
    tr, _ = data.synthetic_fedprox(seed=1, **kw)
    return np.stack([tr.x[k, :n].mean(0) for k, n in enumerate(tr.num_examples)])
  # beta scales the spread of the clients' input means v_k ~ N(B_k, 1), B_k ~ N(0, beta).
  spread_small = client_means(alpha=0.0, beta=0.0).mean(1).std()
  spread_big = client_means(alpha=0.0, beta=5.0).mean(1).std()
  assert spread_big > 5 * spread_small
  iid_means = client_means(alpha=0.0, beta=0.0, iid=True)
  assert np.abs(iid_means).mean() < 0.2  # v_k = 0

  # IID: one shared linear labelling, so a linear model fitted on some clients
  # transfers to the others; non-IID: every client has its own W_k, b_k.
  def transfer_acc(**kw):
    tr, _ = data.synthetic_fedprox(seed=2, num_clients=10, **kw)
    x, y = _pool(tr, slice(0, 5))
    xo, yo = _pool(tr, slice(5, 10))
    return (_fit_linear(x, y, 10, steps=500, lr=3e-2)(xo) == yo).mean()
  assert transfer_acc(alpha=0.0, beta=0.0, iid=True) > 0.8
  assert transfer_acc(alpha=1.0, beta=0.0) < 0.5


def test_fedprox_deterministic():
  a, _ = data.synthetic_fedprox(0.5, 0.5, seed=3, num_clients=8)
  b, _ = data.synthetic_fedprox(0.5, 0.5, seed=3, num_clients=8)
  c, _ = data.synthetic_fedprox(0.5, 0.5, seed=4, num_clients=8)
  np.testing.assert_array_equal(a.x, b.x)
  assert a.x.shape != c.x.shape or not np.array_equal(a.x, c.x)
