"""Synthetic federated datasets, generated in memory (no download).

`synthetic_images` is the project's embedded default image dataset: a
FEMNIST-like, non-IID, learnable but not trivial task. Each class is a fixed
random "glyph" of smooth strokes (cubic Bezier curves); each client is a writer
with its own affine distortion (rotation, scale, shear, shift), stroke
thickness, contrast, ink colour and background; every example adds its own
small deformation and pixel noise; and each client's labels follow its own
Dirichlet class prior (label skew) and size (quantity skew). Each client gets a
train set and a local test set from the same writer and label prior.

`synthetic_fedprox` is the Synthetic(alpha, beta) benchmark of FedProx (Li et al.,
MLSys 2020), following the reference generator `data/synthetic_*/generate_niid.py`.

Both are pure numpy functions of an integer `seed` and deterministic in it.
"""
from __future__ import annotations

import numpy as np

from fedjax_prune.data._client_data import ClientData, from_client_lists

_POINTS_PER_STROKE = 20
_STROKES_PER_CLASS = 3
_RENDER_CHUNK = 2048


def _client_sizes(rng, num_clients, examples_per_client, size_sigma):
  if isinstance(examples_per_client, (int, np.integer)):
    lo = hi = int(examples_per_client)
  else:
    lo, hi = (int(v) for v in examples_per_client)
  if not 1 <= lo <= hi:
    raise ValueError(f"examples_per_client must be an int >= 1 or a (lo, hi) pair with "
                     f"1 <= lo <= hi, got {examples_per_client!r}")
  if size_sigma is None:
    return rng.integers(lo, hi + 1, size=num_clients)
  if not np.isfinite(size_sigma) or size_sigma < 0:
    raise ValueError(f"size_sigma must be None or a finite number >= 0, got {size_sigma!r}")
  # Log-normal around the geometric mean of the range, clipped to [lo, hi].
  sizes = np.exp(rng.normal(np.log(np.sqrt(lo * hi)), size_sigma, size=num_clients))
  return np.clip(np.round(sizes), lo, hi).astype(np.int64)


def _class_glyphs(rng, num_classes):
  """[K, S, 4, 2] Bezier control points of each class's strokes: random walks in [-0.7, 0.7]."""
  start = rng.uniform(-0.5, 0.5, size=(num_classes, _STROKES_PER_CLASS, 1, 2))
  steps = rng.normal(0.0, 0.45, size=(num_classes, _STROKES_PER_CLASS, 3, 2))
  ctrl = start + np.concatenate([np.zeros_like(start), np.cumsum(steps, axis=2)], axis=2)
  return np.clip(ctrl, -0.7, 0.7)


def _bezier_basis():
  t = np.linspace(0.0, 1.0, _POINTS_PER_STROKE)[:, None]
  return np.concatenate([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3], axis=1)


def _affine(rot, log_scale, shear):
  """[..., 2, 2] matrices R(rot) @ Shear(shear) @ diag(exp(log_scale))."""
  c, s = np.cos(rot), np.sin(rot)
  z = np.exp(log_scale)
  # [[c, -s], [s, c]] @ [[1, shear], [0, 1]] * z
  return np.stack([np.stack([c * z, (c * shear - s) * z], -1),
                   np.stack([s * z, (s * shear + c) * z], -1)], -2)


def _render(points_MxSxPx2, sigma_M, height, width):
  """[M, H, W] float32 ink in [0, 1]: separable Gaussian splats along the strokes.

  Each point's splat is weighted by the arc length it stands for, divided by the
  Gaussian's line integral, so a stroke's centre line sums to ~1 whatever its
  length or thickness; `1 - exp(-2.5 s)` then saturates crossings smoothly.
  """
  # Normalised coords [-1, 1] -> pixel centres.
  px = (points_MxSxPx2[..., 0] + 1.0) * 0.5 * (width - 1)
  py = (points_MxSxPx2[..., 1] + 1.0) * 0.5 * (height - 1)
  seg = np.hypot(np.diff(px, axis=-1), np.diff(py, axis=-1))  # [M, S, P-1]
  pad = np.zeros_like(seg[..., :1])
  arc = 0.5 * (np.concatenate([pad, seg], -1) + np.concatenate([seg, pad], -1))
  m = len(px)
  weight = np.minimum(arc / (sigma_M[:, None, None] * np.sqrt(2 * np.pi)), 1.0).reshape(m, -1)
  px, py = px.reshape(m, -1), py.reshape(m, -1)
  inv = (-0.5 / sigma_M ** 2)[:, None, None]
  gx = np.exp(inv * (np.arange(width)[None, None, :] - px[..., None]) ** 2).astype(np.float32)
  gy = np.exp(inv * (np.arange(height)[None, None, :] - py[..., None]) ** 2)
  gy = (gy * weight[..., None]).astype(np.float32)
  s = np.matmul(gy.transpose(0, 2, 1), gx)  # [M, H, W]
  return -np.expm1(-2.5 * s)


def synthetic_images(num_clients: int, *, seed: int, image_shape=(28, 28, 1), num_classes: int = 10,
                     examples_per_client=(50, 150), size_sigma: float | None = None,
                     test_examples_per_client: int = 20, label_skew_alpha: float | None = 0.5,
                     writer_distortion: float = 1.0, example_jitter: float = 1.0,
                     noise: float = 0.1, dtype=np.uint8) -> tuple[ClientData, ClientData]:
  """A FEMNIST-like non-IID image dataset: class glyphs drawn by per-client writers.

  Args:
    num_clients: n >= 1 writers.
    seed: integer seed; the output is a deterministic function of all arguments.
    image_shape: (H, W, C), H, W >= 8, C >= 1 (C > 1 gives coloured ink/background).
    num_classes: K >= 2 glyph classes.
    examples_per_client: train examples per client: an int, or (lo, hi) inclusive
      (uniform, or log-normal around sqrt(lo*hi) clipped to [lo, hi] when
      `size_sigma` is given).
    size_sigma: log-normal shape of the client sizes, or None for uniform.
    test_examples_per_client: local test examples per client (>= 1), same writer
      and label prior as its train set.
    label_skew_alpha: each client's class prior ~ Dir(alpha * 1_K); None = uniform
      labels (no label skew). Small alpha: few classes per client.
    writer_distortion: scale of the per-writer variation (affine, thickness,
      contrast, background), >= 0; 0 = every writer identical.
    example_jitter: scale of the per-example deformation, >= 0.
    noise: std of additive Gaussian pixel noise on the [0, 1] scale, >= 0.
    dtype: np.uint8 (0..255) or a float dtype ([0, 1]).

  Returns:
    (train, test): ClientData with x [n, E, H, W, C] of `dtype`, y [n, E] int32,
    num_examples [n] int32 (host numpy arrays).

  Example:
    >>> train, test = synthetic_images(4, seed=0, examples_per_client=(8, 12))
    >>> train.x.shape[0], train.x.shape[2:], test.num_examples.tolist()
    (4, (28, 28, 1), [20, 20, 20, 20])
  """
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if len(image_shape) != 3 or min(image_shape[:2]) < 8 or image_shape[2] < 1:
    raise ValueError(f"image_shape must be (H, W, C) with H, W >= 8 and C >= 1, got {image_shape!r}")
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  if int(test_examples_per_client) != test_examples_per_client or test_examples_per_client < 1:
    raise ValueError(f"test_examples_per_client must be an integer >= 1, got {test_examples_per_client!r}")
  if label_skew_alpha is not None and (not np.isfinite(label_skew_alpha) or label_skew_alpha <= 0):
    raise ValueError(f"label_skew_alpha must be None or a finite number > 0, got {label_skew_alpha!r}")
  for name, v in (("writer_distortion", writer_distortion), ("example_jitter", example_jitter),
                  ("noise", noise)):
    if not np.isfinite(v) or v < 0:
      raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
  dtype = np.dtype(dtype)
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise ValueError(f"dtype must be uint8 or a float dtype, got {dtype}")
  h, w, ch = (int(v) for v in image_shape)
  n, k = int(num_clients), int(num_classes)
  wd, ej = float(writer_distortion), float(example_jitter)
  rng = np.random.default_rng(seed)

  glyphs = _class_glyphs(rng, k)
  n_train = _client_sizes(rng, n, examples_per_client, size_sigma)
  n_test = np.full(n, int(test_examples_per_client), np.int64)
  per_client = n_train + n_test
  total = int(per_client.sum())
  client_M = np.repeat(np.arange(n), per_client)

  # Labels: a Dirichlet class prior per client.
  if label_skew_alpha is None:
    priors = np.full((n, k), 1.0 / k)
  else:
    priors = rng.dirichlet(np.full(k, float(label_skew_alpha)), size=n)
  cdf = np.cumsum(priors, axis=1)
  u = rng.random(total)[:, None] * cdf[client_M, -1:]
  labels_M = np.minimum((cdf[client_M] <= u).sum(1), k - 1)

  # Writers.
  u_w = lambda *shape: rng.uniform(-1.0, 1.0, size=(n,) + shape)  # noqa: E731
  writer_A = _affine(0.26 * wd * u_w(), 0.15 * wd * u_w(), 0.3 * wd * u_w())
  writer_shift = 0.12 * wd * u_w(2)
  writer_sigma = np.exp(0.35 * wd * u_w())
  writer_contrast = np.clip(1.0 - 0.5 * wd * rng.uniform(0.0, 1.0, size=n), 0.35, 1.0)
  ink = np.ones((n, ch)) if ch == 1 else rng.uniform(0.35, 1.0, size=(n, ch))
  background = np.clip(0.15 * wd, 0, 0.3) * rng.uniform(0.0, 1.0, size=(n, ch))

  # Examples.
  ctrl = glyphs[labels_M] + rng.normal(0.0, 0.12 * ej, size=(total, _STROKES_PER_CLASS, 4, 2))
  pts = np.einsum("pc,mscd->mspd", _bezier_basis(), ctrl)  # [M, S, P, 2]
  ex_A = _affine(rng.normal(0.0, 0.2 * ej, total), rng.normal(0.0, 0.12 * ej, total),
                 rng.normal(0.0, 0.16 * ej, total))
  A = np.matmul(writer_A[client_M], ex_A)
  shift = writer_shift[client_M] + rng.normal(0.0, 0.1 * ej, size=(total, 2))
  pts = np.einsum("mij,mspj->mspi", A, pts) + shift[:, None, None, :]
  sigma = (1.1 * w / 28.0) * writer_sigma[client_M] * np.exp(rng.normal(0.0, 0.2 * ej, total))
  sigma = np.maximum(sigma, 0.4)

  images = np.empty((total, h, w, ch), dtype)
  for s in range(0, total, _RENDER_CHUNK):
    sl = slice(s, s + _RENDER_CHUNK)
    c = client_M[sl]
    ink_M = _render(pts[sl], sigma[sl], h, w)[..., None]  # [m, H, W, 1]
    top = (writer_contrast[c][:, None] * ink[c])[:, None, None, :]
    bg = background[c][:, None, None, :]
    img = bg + (top - bg) * ink_M
    if noise > 0:
      img = img + rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0)
    images[sl] = np.round(img * 255.0) if dtype == np.uint8 else img

  labels_M = labels_M.astype(np.int32)
  starts = np.concatenate([[0], np.cumsum(per_client)[:-1]])
  train_x = [images[a:a + m] for a, m in zip(starts, n_train)]
  train_y = [labels_M[a:a + m] for a, m in zip(starts, n_train)]
  test_x = [images[a + m:a + m + t] for a, m, t in zip(starts, n_train, n_test)]
  test_y = [labels_M[a + m:a + m + t] for a, m, t in zip(starts, n_train, n_test)]
  return from_client_lists(train_x, train_y), from_client_lists(test_x, test_y)


def synthetic_fedprox(alpha: float, beta: float, *, seed: int, num_clients: int = 30, dim: int = 60,
                      num_classes: int = 10, iid: bool = False,
                      train_fraction: float = 0.9) -> tuple[ClientData, ClientData]:
  """FedProx's Synthetic(alpha, beta) logistic-regression benchmark.

  For client k: u_k ~ N(0, alpha), W_k ~ N(u_k, 1) [dim, K], b_k ~ N(u_k, 1) [K];
  B_k ~ N(0, beta), v_k ~ N(B_k, 1) [dim]; x ~ N(v_k, Sigma) with Sigma diagonal,
  Sigma_jj = j^-1.2 (j = 1..dim); y = argmax(softmax(W_k^T x + b_k)). alpha
  controls how much the local models differ, beta how much the local inputs
  differ. Client sizes are `int(LogNormal(4, 2)) + 50` (the paper's power law).
  With `iid=True` all clients share one W, b ~ N(0, 1) and v_k = B_k * 1 (the
  reference's Synthetic-IID is `alpha = beta = 0, iid=True`). Each client's
  examples are split `train_fraction` / rest into train / local test.

  As in the reference code, alpha and beta are used as *standard deviations*
  (`np.random.normal(0, alpha)`), although the paper writes N(0, alpha).

  Args:
    alpha: model heterogeneity, >= 0.
    beta: input heterogeneity, >= 0.
    seed: integer seed.
    num_clients: n >= 1 (paper: 30).
    dim: input dimension (paper: 60).
    num_classes: K >= 2 (paper: 10).
    iid: shared model and input mean (see above).
    train_fraction: fraction of each client's examples in train, in (0, 1).

  Returns:
    (train, test): ClientData with x [n, E, dim] float32, y [n, E] int32.

  References:
    Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020;
    github.com/litian96/FedProx `data/synthetic_1_1/generate_niid.py`.
  """
  if not np.isfinite(alpha) or alpha < 0:
    raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
  if not np.isfinite(beta) or beta < 0:
    raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
  if int(num_clients) != num_clients or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  if int(dim) != dim or dim < 1:
    raise ValueError(f"dim must be a positive integer, got {dim!r}")
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  if not 0 < train_fraction < 1:
    raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
  n, k = int(num_clients), int(num_classes)
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, n).astype(np.int64) + 50
  mean_w = rng.normal(0.0, alpha, n)
  big_b = rng.normal(0.0, beta, n)
  cov_diag = np.arange(1, dim + 1, dtype=np.float64) ** -1.2
  if iid:
    mean_x = np.repeat(big_b[:, None], dim, axis=1)
    w_global = rng.normal(0.0, 1.0, (dim, k))
    b_global = rng.normal(0.0, 1.0, k)
  else:
    mean_x = rng.normal(big_b[:, None], 1.0, (n, dim))
  xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
  for i in range(n):
    if iid:
      w_i, b_i = w_global, b_global
    else:
      w_i = rng.normal(mean_w[i], 1.0, (dim, k))
      b_i = rng.normal(mean_w[i], 1.0, k)
    x = mean_x[i] + np.sqrt(cov_diag) * rng.standard_normal((sizes[i], dim))
    y = np.argmax(x @ w_i + b_i, axis=1)  # softmax is monotone
    n_tr = int(train_fraction * sizes[i])
    xs_tr.append(x[:n_tr].astype(np.float32))
    ys_tr.append(y[:n_tr].astype(np.int32))
    xs_te.append(x[n_tr:].astype(np.float32))
    ys_te.append(y[n_tr:].astype(np.int32))
  return from_client_lists(xs_tr, ys_tr), from_client_lists(xs_te, ys_te)
