"""FIARSE: importance-aware submodel extraction by global magnitude thresholds.

Each client i has a capacity gamma_i in (0, 1] (fraction of the maskable
parameters it trains). Its submodel is the global top-k of |x| with
k = floor(gamma_i * n): mask m_i(x) = 1[|x| >= tau_i]. The server computes tau for
every capacity level from ONE sort of |x| per round (stored in the state);
each client reads its tau as a vmapped scalar and re-evaluates the mask on its
*current* weights inside every local step (tau fixed during local training), so
a weight that shrinks below tau drops out. The server averages each coordinate
over the clients whose update touched it (delta != 0) and applies it with a
server learning rate (as the official code's `fiarse/server.py`).

Two gradients (the official code's `Bern` autograd function):
  * `'masked'`: g * m -- what the released code computes (its surrogate backward
    hangs off a bool tensor and never runs); use it to reproduce the paper table.
  * `'tcb'`: the TCB-GD surrogate g * m * (1 + 2 tau |x| / (|x| + tau)^2), as a
    `jax.custom_vjp` on the masking function.

Layer-wise variant (`fiarse_layerwise` in the released code): one threshold per
stage group (stem, stage1..4, head for the ResNets here), each keeping
floor(gamma * n_group) of its own parameters. On the text models every top-level key
is its own group (embed, pos_embed, each block_l, head), as `fiarse_nlp`'s
`MaskedRoberta_fine`: separate thresholds for the embeddings and per encoder layer.

Text models (LSTM, transformer) run unchanged: the ranking is over parameter
entries, whatever the architecture; LayerNorm scale/bias stay dense
(`default_maskable`).

No per-capacity-group execution (the width methods' `GroupedExecution`): a FIARSE
submodel is an unstructured magnitude mask, scattered over every layer's full shape
and re-evaluated at every step, so no level has a smaller dense model to run; one
program per level would run the same full-size dense convolutions and matmuls as the
masked round (XLA's dense kernels cost the same whatever the zeros), adding L compiles
and a branch per client for no saving. A speed-up would need sparse kernels.

References:
  Wu et al., FIARSE: Model-Heterogeneous Federated Learning via Importance-Aware
  Submodel Extraction, NeurIPS 2024 (arXiv 2407.19389); code
  github.com/HarliWu/FIARSE @ 281519c.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import federated
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalSchedule,
                                    make_local_train, softmax_cross_entropy)
from fedjax_prune.masks._filters import path_str
from fedjax_prune.pruning import _hetero
from fedjax_prune.pruning._hetero import HeteroMethod, HeteroState
from fedjax_prune.types import Masks, Params, PyTree

GRADS = ("masked", "tcb")
FOUR_LEVELS = (1.0, 1 / 4, 1 / 16, 1 / 64)        # the official README's 4 sizes, 25 clients each
FIVE_LEVELS = (1.0, 0.64, 0.36, 0.16, 0.04)      # the official README's 5 sizes, 20 clients each
SWEEP_LEVELS = tuple(1.0 / 2 ** i for i in range(0, 9))  # 1 ... 1/256 (the official extra sweep)

_STAGE_KEY = re.compile(r"^(stage\d+)_block\d+$")
_LAYER_NORM_KEY = re.compile(r"^ln(_\d+|_f)$")  # the text models' LayerNorms (ln_1, ln_2, ln_f)


def default_maskable(params: Params) -> PyTree:
  """FIARSE's maskable set: every parameter except normalisation scale/bias (static bools).

  BatchNorm as `_hetero.default_maskable` (the CIFAR code: BN affine always dense) and,
  for the text models, LayerNorm (`fiarse_nlp/model/agnews/masked_roberta.py` keeps
  RoBERTa's LayerNorms plain `nn.LayerNorm`, unmasked, while its embeddings and
  linear layers are masked). Embeddings and the output head are ranked: the head is
  the CIFAR code's masked classifier, and for a language model it is the output
  embedding (tied to the masked input embedding in RoBERTa's LM head).
  """
  is_norm = lambda path: any(_LAYER_NORM_KEY.match(k) for k in path_str(path).split("/")[:-1])
  return jax.tree_util.tree_map_with_path(lambda path, m: bool(m) and not is_norm(path),
                                          _hetero.default_maskable(params))


# ----------------------------------------------------------------------------- masking


@jax.custom_vjp
def tcb_mask(x: jax.Array, tau: jax.Array) -> jax.Array:
  """x * 1[|x| >= tau] with the TCB-GD surrogate gradient.

  Forward: the hard magnitude mask. Backward (w.r.t. x):
  g * m * (1 + 2 tau |x| / (|x| + tau)^2), the chain rule through
  x * m(|x|) with dm/ds := 2 tau / (s + tau)^2 on kept entries; tau gets no
  gradient (it is fixed during local training).

  Args:
    x: any-shape array.
    tau: [] threshold (>= 0; +inf keeps nothing).
  """
  return jnp.where(jnp.abs(x) >= tau, x, jnp.zeros((), x.dtype))


def _tcb_fwd(x, tau):
  return tcb_mask(x, tau), (x, tau)


def _tcb_bwd(res, g):
  x, tau = res
  s = jnp.abs(x)
  keep = s >= tau
  # Safe denominators: tau = +inf (nothing kept) or s = tau = 0 would give nan.
  tau_safe = jnp.where(jnp.isfinite(tau), tau, 0.0).astype(x.dtype)
  denom = jnp.square(s + tau_safe)
  factor = 1.0 + 2.0 * tau_safe * s / jnp.where(denom > 0, denom, 1.0)
  return jnp.where(keep, g * factor, jnp.zeros((), g.dtype)), jnp.zeros_like(tau)


tcb_mask.defvjp(_tcb_fwd, _tcb_bwd)


def hard_mask(x: jax.Array, tau: jax.Array) -> jax.Array:
  """x * 1[|x| >= tau]; autodiff gives the plain masked gradient g * m."""
  return jnp.where(jnp.abs(x) >= tau, x, jnp.zeros((), x.dtype))


def stage_groups(params: Params) -> PyTree:
  """Static int tree: the stage group of every leaf (FIARSE's layer-wise variant).

  Top-level keys 'stage{s}_block{b}' share group 'stage{s}'; every other
  top-level key (stem, head, exit heads, dense_0, ...) is its own group. Groups
  are numbered in order of first appearance in the flattened tree.
  """
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = path_str(path).split("/")[0]
    m = _STAGE_KEY.match(top)
    names.append(m.group(1) if m else top)
  order = list(dict.fromkeys(names))
  ids = [order.index(n) for n in names]
  return jax.tree.unflatten(jax.tree.structure(params), ids)


def _group_tree(params: Params, layerwise: bool) -> tuple[PyTree, int]:
  if not layerwise:
    return jax.tree.map(lambda _: 0, params), 1
  groups = stage_groups(params)
  return groups, max(jax.tree.leaves(groups)) + 1


def thresholds(params: Params, capacities: Sequence[float], maskable: PyTree | None = None, *,
               layerwise: bool = False) -> jax.Array:
  """tau for every capacity level (and stage group) from one sort of |x| per group.

  k = floor(gamma * n) entries are kept: tau is the k-th largest |x|, so
  `|x| >= tau` keeps >= k entries (more only on ties). gamma = 1 gives the
  smallest |x| (everything kept); k = 0 gives +inf (nothing kept).

  Args:
    params: parameter tree.
    capacities: L static capacity levels in (0, 1].
    maskable: static bool tree (default `default_maskable`): which leaves are ranked.
    layerwise: one threshold per stage group (`stage_groups`) instead of one global one.

  Returns:
    [L, G] float32 thresholds (G = 1 unless layerwise; groups with no maskable
    leaf get 0, i.e. dense).
  """
  caps = _hetero.check_capacities(capacities)
  maskable = default_maskable(params) if maskable is None else maskable
  groups, num_groups = _group_tree(params, layerwise)
  flat_p = jax.tree.leaves(params)
  flat_m = jax.tree.leaves(maskable)
  flat_g = jax.tree.leaves(groups)
  if not (len(flat_p) == len(flat_m) == len(flat_g)):
    raise ValueError("maskable must have the structure of params (one bool per leaf)")
  columns = []
  for g in range(num_groups):
    vals = [jnp.abs(p).reshape(-1).astype(jnp.float32)
            for p, m, gg in zip(flat_p, flat_m, flat_g) if bool(m) and gg == g]
    if not vals:
      columns.append(jnp.zeros((len(caps),), jnp.float32))
      continue
    v = jnp.sort(jnp.concatenate(vals))  # ascending; the k-th largest is v[n - k]
    n = v.shape[0]
    taus = []
    for c in caps:
      k = int(np.floor(c * n + 1e-9))  # + 1e-9: exact products like 0.25 * 4 stay 1, not 0.999..
      taus.append(v[n - k] if k > 0 else jnp.asarray(jnp.inf, jnp.float32))
    columns.append(jnp.stack(taus))
  return jnp.stack(columns, axis=1)


def submodel_params(params: Params, tau_G: jax.Array, maskable: PyTree | None = None, *,
                    layerwise: bool = False, grad: str = "masked") -> Params:
  """The submodel x * 1[|x| >= tau] as full-size params (unmaskable leaves as they are).

  Args:
    params: parameter tree.
    tau_G: [G] thresholds of one capacity level (a row of `thresholds`).
    maskable: static bool tree (default `default_maskable`).
    layerwise: whether tau_G is per stage group.
    grad: 'masked' or 'tcb' (the gradient when differentiated).
  """
  if grad not in GRADS:
    raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
  maskable = default_maskable(params) if maskable is None else maskable
  groups, _ = _group_tree(params, layerwise)
  fn = tcb_mask if grad == "tcb" else hard_mask
  return jax.tree.map(lambda p, m, g: fn(p, tau_G[g].astype(p.dtype)) if m else p,
                      params, maskable, groups)


def submodel_masks(params: Params, tau_G: jax.Array, maskable: PyTree | None = None, *,
                   layerwise: bool = False) -> Masks:
  """Bool masks 1[|x| >= tau] (full shape; `()` True for unmaskable leaves)."""
  maskable = default_maskable(params) if maskable is None else maskable
  groups, _ = _group_tree(params, layerwise)
  return jax.tree.map(lambda p, m, g: jnp.abs(p) >= tau_G[g] if m else jnp.ones((), bool),
                      params, maskable, groups)


# ----------------------------------------------------------------------------- algorithm


def fiarse(apply_fn: Callable, client_optimizer: optax.GradientTransformation,
           schedule: LocalSchedule, *, capacities: Sequence[float] = FOUR_LEVELS,
           grad: str = "masked", layerwise: bool = False, server_learning_rate: float = 1.0,
           maskable_fn: Callable[[Params], PyTree] = default_maskable,
           loss_fn: Callable = softmax_cross_entropy,
           train_transform: Callable | None = None,
           aggregator: federated.Aggregator | None = None,
           release_all: bool = False) -> HeteroMethod:
  """FIARSE as a `HeteroMethod` (engine algorithm + evaluation submodel).

  Args:
    apply_fn: `apply_fn(params, batch_stats, x, *, train, example_mask) -> (logits, stats)`
      of the full-size model (static BN: norm='batch_static').
    client_optimizer: local optimizer (paper: plain SGD lr 0.1, fresh each round).
    schedule: local steps (paper: 100 iterations of batch 20).
    capacities: the L capacity levels; a client uses the level nearest to its
      `ClientInfo.capacity`.
    grad: 'masked' (released code) or 'tcb' (TCB-GD surrogate).
    layerwise: one threshold per stage group instead of one global threshold.
    server_learning_rate: eta_g (paper: 1.0).
    maskable_fn: params -> static bool tree of ranked leaves (default: all but BatchNorm and
      LayerNorm scale/bias, `default_maskable`).
    loss_fn: per-example loss.
    train_transform: per-batch augmentation `(x, key) -> x`.
    aggregator: None: each coordinate's mean over the clients whose update touched it. A
      `federated.Aggregator` (robust, DP, compressed) gets each client's update on the
      coordinates it touched (`_hetero.counted_view`); its state (the adaptive clip norm,
      the error-feedback memory) is `HeteroState.aggregator`, checkpointed with the server
      state. The touched coordinates depend on the client's data, so no per-coordinate
      count is public: a DP mean keeps the fixed denominator m, and must release every
      coordinate (`release_all`).
    release_all: the server applies the aggregate on every coordinate, not only where
      some client's update touched (needs `aggregator`). Set it with a DP mean that puts
      its noise on every coordinate (`federated.dp_mean(..., noise_on_present=False)`):
      the released set is then the whole (public) server model, and untouched coordinates
      move by the noise / m, so the released model does not reveal which coordinates the
      sampled clients touched. The metric `coverage` reads 1.

  Returns:
    HeteroMethod; `algorithm.init(params, key, batch_stats=None) -> HeteroState`
    whose `aux` holds the [L, G] thresholds of the current global params.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> from fedjax_prune.pruning import fiarse
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> method = fiarse.fiarse(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                        capacities=(1.0, 0.25))
    >>> state = method.algorithm.init(params, jax.random.key(1))
    >>> state.aux.shape
    (2, 1)
    >>> round_fn = federated.make_round(method.algorithm)
    >>> cohort = federated.make_cohort([0, 1, 2], capacity=[1.0, 0.25, 0.25])
    >>> state, metrics = round_fn(state, data, cohort, jax.random.key(2))
    >>> int(state.round_idx)
    1
  """
  caps = _hetero.check_capacities(capacities)
  if grad not in GRADS:
    raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
  if not server_learning_rate > 0:
    raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
  client_optimizer = _hetero.check_optimizer(client_optimizer)

  def taus(params):
    return thresholds(params, caps, maskable_fn(params), layerwise=layerwise)

  def init(params: Params, key: jax.Array, batch_stats=None) -> HeteroState:
    del key  # deterministic given params
    return _hetero.init_state(params, batch_stats, taus)

  def client_update(state: HeteroState, data, info: ClientInfo, key: jax.Array) -> ClientOutput:
    tau_G = state.aux[_hetero.level_index(caps, info.capacity)]  # [G], this client's level
    maskable = maskable_fn(state.params)
    # The mask is re-derived from the current weights at every forward pass.
    sub_apply = _hetero.wrap_apply(apply_fn, lambda p: submodel_params(
        p, tau_G, maskable, layerwise=layerwise, grad=grad))
    local_train = make_local_train(sub_apply, client_optimizer, schedule, loss_fn=loss_fn,
                                   train_transform=train_transform)
    local, metrics = local_train(state.params, state.batch_stats, data, key)
    # Partial averaging counts the coordinates this client's update touched (delta != 0, as
    # the official code; mask membership differs only for exact-zero updates).
    present = jax.tree.map(lambda a, b: a != b, state.params, local.params)
    return _hetero.client_output(state, local.params, local.batch_stats, present, metrics)

  def server_update(state: HeteroState, outputs: ClientOutput, key: jax.Array):
    del key
    return _hetero.server_step(state, outputs, server_learning_rate, taus)

  def submodel(state: HeteroState, capacity) -> tuple[Params, jax.Array]:
    """Size-`capacity` submodel; capacities not among the levels get their own tau."""
    tau_G = thresholds_for(state.params, capacity)
    return (submodel_params(state.params, tau_G, maskable_fn(state.params), layerwise=layerwise),
            jnp.zeros((), jnp.int32))

  def thresholds_for(params, capacity):
    return _traced_thresholds(params, capacity, maskable_fn(params), layerwise)

  return HeteroMethod(_hetero.in_path(FedAlgorithm(init, client_update, server_update), aggregator,
                                      release_all=release_all), submodel)


def _traced_thresholds(params: Params, capacity, maskable: PyTree, layerwise: bool) -> jax.Array:
  """[G] thresholds for one (possibly traced) capacity: one sort per group."""
  groups, num_groups = _group_tree(params, layerwise)
  flat = list(zip(jax.tree.leaves(params), jax.tree.leaves(maskable), jax.tree.leaves(groups)))
  out = []
  cap = jnp.asarray(capacity, jnp.float32)
  for g in range(num_groups):
    vals = [jnp.abs(p).reshape(-1).astype(jnp.float32) for p, m, gg in flat if bool(m) and gg == g]
    if not vals:
      out.append(jnp.zeros((), jnp.float32))
      continue
    v = jnp.sort(jnp.concatenate(vals))
    n = v.shape[0]
    k = jnp.floor(cap * n + 1e-3).astype(jnp.int32)  # float32: tolerate round-off of c * n
    out.append(jnp.where(k > 0, v[jnp.clip(n - k, 0, n - 1)], jnp.inf))
  return jnp.stack(out)


def fiarse_method(hetero: HeteroMethod, *, layerwise: bool = False,
                  maskable_fn: Callable[[Params], PyTree] = default_maskable,
                  **kwargs) -> federated.Method:
  """FIARSE end to end: `fiarse(...)`'s algorithm, evaluated per capacity level.

  Nothing runs between rounds: each client's importance-aware submodel (|x| >= the
  level's threshold) is derived inside the compiled round. A level's size in the
  summary counts the entries its threshold keeps on the final global model.

  Args:
    hetero: `fiarse(...)`.
    layerwise, maskable_fn: as given to `fiarse` (the level masks use the same).
    **kwargs: `_hetero.submodel_method`'s keyword arguments (spec, params, batch_stats,
      key, eval_apply, test, client_caps, capacities, sweep, sweep_every, num_rounds).
  """
  capacities = tuple(float(c) for c in kwargs["capacities"])

  def level_masks(state, capacity):
    params = jax.device_get(state.params)
    maskable = maskable_fn(params)
    tau_LxG = thresholds(params, capacities, maskable, layerwise=layerwise)
    masks = submodel_masks(params, tau_LxG[capacities.index(float(capacity))], maskable,
                           layerwise=layerwise)
    return jax.tree.map(lambda m: np.asarray(m) != 0, jax.device_get(masks))

  return _hetero.submodel_method(hetero, level_masks=level_masks, **kwargs)
