"""Structured surgery: remove output channels and get a smaller dense model.

`shrink(spec, params, keep)` returns the smaller spec and the sliced params
(and BatchNorm statistics, optimizer state): removing a filter takes its
kernel column, bias and BatchNorm entries, and the matching input rows of
every layer that reads it (through concatenations and NHWC flattens).

Contract (tested for every model of the zoo): the shrunk model's outputs equal
the dense model's outputs with `keep_masks(spec, keep)` applied, and the
accounting of the shrunk spec equals the accounting of the masked dense one.

Host-side only (numpy slicing on concrete arrays); never jit it. The model is
rebuilt from the new spec and the round re-jitted once afterwards.

Text models (LSTMSpec, TransformerSpec): `groups`, `keep_indices`, `slice_like`,
`shrink`, `keep_masks` and `group_l1` hand them to the `text_*` functions of
`_text_shrink` (same contract), so a method written against these entry points
prunes LSTM units, attention heads and FFN units unchanged.

`keep` is a tree keyed like the params (or a flat dict with '/'-joined keys)
whose leaves are, per channel group (see `groups`), either a bool vector
[width] (True = keep) or an int vector of kept indices. A group may be named
by any of its producers (e.g. a ResNet stage by 'stage2_block0/conv2' or
'stage2_block0/shortcut_conv'); groups not named keep every channel.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import models
from fedjax_prune.structured import _graph
from fedjax_prune.types import BatchStats, Masks, Params, PyTree

Keep = Any  # tree / flat dict of bool [width] or int index vectors, per channel group


class Shrunk(NamedTuple):
  """Result of `shrink` (fields not passed in are None)."""
  spec: Any
  params: Params
  batch_stats: Optional[BatchStats]
  opt_state: Optional[PyTree]


def _text():
  """The text-model surgery (`_text_shrink` imports this module, so it is imported late)."""
  from fedjax_prune.structured import _text_shrink
  return _text_shrink


def _is_text(spec) -> bool:
  return isinstance(spec, models.TEXT_SPECS)


def groups(spec) -> tuple[_graph.Group, ...]:
  """The channel groups of `spec`, in forward order (`_graph` module docstring); for a
  text model (LSTMSpec, TransformerSpec) its units / heads (`text_groups`)."""
  if _is_text(spec):
    return _text().text_groups(spec)
  return _graph.graph(spec).groups


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def keep_entry_indices(name: str, leaf: Any, width: int, group: str, *,
                       allow_empty: bool = False, caller: str = 'shrink') -> np.ndarray:
  """One `keep` entry as sorted kept indices: a bool [width] vector or an int index vector
  (an empty vector only when `allow_empty`: the whole group removed).

  Raises:
    ValueError naming the entry: traced (surgery runs on the host), a bool vector of another
    length, indices outside [0, width) or repeated, or another dtype/shape.
  """
  try:
    arr = np.asarray(leaf)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(f'keep[{name!r}] is traced; {caller} runs on the host, outside jit') from None
  if arr.dtype == bool:
    if arr.shape != (width,):
      raise ValueError(f'keep[{name!r}] is a bool vector of shape {arr.shape}, expected '
                       f'({width},) (the width of group {group!r})')
    return np.flatnonzero(arr)
  if np.issubdtype(arr.dtype, np.integer) and arr.ndim == 1:
    idx = np.sort(arr.astype(np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= width):
      raise ValueError(f'keep[{name!r}] has indices outside [0, {width})')
    if np.unique(idx).size != idx.size:
      raise ValueError(f'keep[{name!r}] repeats an index')
    return idx
  if allow_empty and arr.size == 0 and arr.ndim == 1:
    return np.zeros((0,), np.int64)  # an empty list: remove the whole group
  raise ValueError(f'keep[{name!r}] must be a bool [width] or int index vector, got '
                   f'dtype {arr.dtype} shape {arr.shape}')


def keep_indices(spec, keep: Keep) -> dict[str, np.ndarray]:
  """Validated kept channel indices (sorted int arrays) for every group of `spec`.

  Raises:
    ValueError: naming the entry when it names no prunable layer, has the wrong
      length, keeps no channel, holds out-of-range or repeated indices, or when
      two producers of one group disagree.
  """
  if _is_text(spec):
    return _text().text_keep_indices(spec, keep)
  g = _graph.graph(spec)
  by_producer = {'/'.join(p): grp for grp in g.groups for p in grp.producers}
  chosen: dict[str, tuple[str, np.ndarray]] = {}
  flat = jax.tree_util.tree_flatten_with_path(keep)[0] if keep is not None else []
  for path, leaf in flat:
    name = '/'.join(_path_keys(path))
    grp = by_producer.get(name)
    if grp is None:
      raise ValueError(f'keep[{name!r}] names no prunable layer of {type(spec).__name__}; '
                       f'prunable: {sorted(by_producer)}')
    idx = keep_entry_indices(name, leaf, grp.width, grp.name)
    if idx.size == 0:
      raise ValueError(f'keep[{name!r}] keeps no channel of group {grp.name!r}; keep at least one')
    if grp.name in chosen and not np.array_equal(chosen[grp.name][1], idx):
      raise ValueError(f'keep[{name!r}] and keep[{chosen[grp.name][0]!r}] disagree, but both '
                       f'produce the channels of the coupled group {grp.name!r}')
    chosen[grp.name] = (name, idx)
  return {grp.name: chosen[grp.name][1] if grp.name in chosen else np.arange(grp.width)
          for grp in g.groups}


def _input_indices(layer: _graph.Layer, idx: dict[str, np.ndarray]) -> np.ndarray:
  """Kept rows of the layer's input axis (concatenated segments, repeated per position)."""
  total = sum(width for _, width in layer.in_segments)
  parts, offset = [], 0
  for group, width in layer.in_segments:
    parts.append((idx[group] if group is not None else np.arange(width)) + offset)
    offset += width
  per_position = np.concatenate(parts)
  return (np.arange(layer.positions)[:, None] * total + per_position[None, :]).reshape(-1)


def _plan(spec, idx: dict[str, np.ndarray]) -> dict[tuple[str, ...], list[tuple[int, np.ndarray]]]:
  """leaf path -> [(axis counted from the end, kept indices)] for params and batch_stats."""
  g = _graph.graph(spec)
  plan: dict[tuple[str, ...], list[tuple[int, np.ndarray]]] = {}
  for layer in g.layers:
    kernel = plan.setdefault(layer.path + ('kernel',), [])
    kernel.append((-2, _input_indices(layer, idx)))
    if layer.out_group is not None:
      kernel.append((-1, idx[layer.out_group]))
      plan[layer.path + ('bias',)] = [(-1, idx[layer.out_group])]
  for grp in g.groups:
    for norm in grp.norms:
      for leaf in ('scale', 'bias', 'mean', 'var'):
        plan[norm + (leaf,)] = [(-1, idx[grp.name])]
  return plan


def _slice_leaf(leaf, cuts: list[tuple[int, np.ndarray]], full_sizes: Optional[tuple[int, ...]]):
  """Takes the kept indices along each axis; broadcast (size-1) and missing axes stay."""
  arr = np.asarray(leaf)
  for axis, keep in cuts:
    if arr.ndim < -axis or arr.shape[axis] == 1 and (full_sizes is None or full_sizes[axis] != 1):
      continue  # a broadcast mask axis (e.g. a (1, .., out) channel mask's input axis)
    arr = np.take(arr, keep, axis=axis)
  return jnp.asarray(arr) if isinstance(leaf, jax.Array) else arr


def _apply_plan(tree: PyTree, plan, shapes: Optional[dict] = None) -> PyTree:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for path, leaf in flat:
    keys = _path_keys(path)
    cuts = plan.get(keys)
    full = shapes.get(keys) if shapes is not None else None
    out.append(leaf if cuts is None else _slice_leaf(leaf, cuts, full))
  return jax.tree.unflatten(treedef, out)


def _shape_dict(spec) -> dict[tuple[str, ...], tuple[int, ...]]:
  params, stats = models.param_shapes(spec)
  out = {}
  for tree in (params, stats):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[_path_keys(path)] = tuple(leaf.shape)
  return out


def _check_tree(tree, spec_tree, what: str) -> None:
  got = {_path_keys(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want = {_path_keys(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(spec_tree)[0]}
  if set(got) != set(want):
    raise ValueError(f'{what} do not match the spec: missing '
                     f'{sorted("/".join(k) for k in set(want) - set(got))}, unexpected '
                     f'{sorted("/".join(k) for k in set(got) - set(want))}')
  for keys, shape in want.items():
    if got[keys] != shape:
      raise ValueError(f'{what} {"/".join(keys)} has shape {got[keys]}, the spec says {shape}')


def slice_like(tree: PyTree, spec, keep: Keep) -> PyTree:
  """Slices every params-shaped subtree of `tree` the way `shrink` slices the params.

  Finds the subtrees with the structure of the params of `spec` (optax moment
  trees such as Adam's `mu`/`nu`, momentum traces, masks, stacked per-client
  copies with leading axes) and the BatchNorm-statistics-shaped ones, and
  slices their leaves along the same axes (counted from the end, so leading
  client axes are fine; size-1 broadcast mask axes are left alone). Other
  leaves (step counts, scalars) are returned unchanged. No isinstance checks
  on optax states: works for any optimizer whose state holds params-like trees.

  Args:
    tree: any pytree, e.g. an optax state or a stacked per-client state.
    spec: the dense spec the tree belongs to.
    keep: kept channels (module docstring).

  Returns:
    The tree with the same structure and sliced leaves.
  """
  if _is_text(spec):
    return _text().text_slice_like(tree, spec, keep)
  plan = _plan(spec, keep_indices(spec, keep))
  params_abs, stats_abs = models.param_shapes(spec)
  structures = [jax.tree.structure(params_abs)]
  if jax.tree.leaves(stats_abs):
    structures.append(jax.tree.structure(stats_abs))
  shapes = _shape_dict(spec)
  is_target = lambda x: not isinstance(x, (jax.Array, np.ndarray)) and any(
      _safe_structure(x) == s for s in structures)

  def visit(x):
    return _apply_plan(x, plan, shapes) if is_target(x) else x

  return jax.tree.map(visit, tree, is_leaf=is_target)


def _safe_structure(x):
  try:
    return jax.tree.structure(x)
  except Exception:  # pragma: no cover - exotic leaves
    return None


def shrink(spec, params: Params, keep: Keep, *, batch_stats: Optional[BatchStats] = None,
           opt_state: Optional[PyTree] = None) -> Shrunk:
  """Removes the channels not in `keep`: the smaller spec and the sliced state.

  Text models (LSTMSpec, TransformerSpec) go to `text_shrink` (units, heads, FFN
  units; whole blocks only through `text_shrink(..., drop_blocks=...)`), so methods
  that call `shrink` / `keep_masks` work on them unchanged.

  Args:
    spec: a model spec of the zoo (MLP, ConvNet, ResNet, Inception, LSTM, transformer).
    params: the model's params (concrete arrays; shapes must match `spec`).
    keep: kept channels per group (module docstring).
    batch_stats: optional BatchNorm running statistics, sliced like the BN params.
    opt_state: optional optimizer (or any per-client) state; every params-shaped
      subtree is sliced (`slice_like`).

  Returns:
    Shrunk(spec, params, batch_stats, opt_state): the new spec and the sliced
    trees (None where not given). `models.make_apply(new_spec)` runs them; its
    outputs equal the dense model's outputs with `keep_masks(spec, keep)`
    applied.

  Example:
    >>> import jax, numpy as np
    >>> from fedjax_prune import models, structured
    >>> spec = models.asp_femnist_cnn(widths=(4, 8))
    >>> _, params, _ = models.build(spec, jax.random.key(0))
    >>> out = structured.shrink(spec, params, {'conv_0': np.array([0, 2])})
    >>> out.spec.convs[0].features, out.params['conv_1']['kernel'].shape
    (2, (5, 5, 2, 8))
  """
  if _is_text(spec):
    if batch_stats is not None and jax.tree.leaves(batch_stats):
      raise ValueError('text models have no batch_stats; pass None or {}')
    out = _text().text_shrink(spec, params, keep, opt_state=opt_state)
    return out._replace(batch_stats=None if batch_stats is None else {})
  idx = keep_indices(spec, keep)
  params_abs, stats_abs = models.param_shapes(spec)
  _check_tree(params, params_abs, 'params')
  if batch_stats is not None:
    _check_tree(batch_stats, stats_abs, 'batch_stats')
  new_spec = _graph.resize(spec, {name: int(i.size) for name, i in idx.items()})
  plan = _plan(spec, idx)
  new_params = _apply_plan(params, plan)
  new_stats = None if batch_stats is None else _apply_plan(batch_stats, plan)
  new_opt = None if opt_state is None else slice_like(opt_state, spec, keep)
  new_params_abs, new_stats_abs = models.param_shapes(new_spec)
  _check_tree(new_params, new_params_abs, 'shrunk params')  # internal consistency
  if new_stats is not None:
    _check_tree(new_stats, new_stats_abs, 'shrunk batch_stats')
  return Shrunk(new_spec, new_params, new_stats, new_opt)


def keep_masks(spec, keep: Keep) -> Masks:
  """Bool masks (params structure) equivalent to removing the channels not in `keep`.

  Kernels get `outer(kept inputs, kept outputs)` shaped (1, .., in, out) for
  convs and (in, out) for denses; biases and BatchNorm scale/bias get [out]
  vectors. Applying them to the dense params (`masks.apply`) gives a model
  whose outputs equal the shrunk model's, and `accounting.param_count` /
  `accounting.flops` of (spec, masks) equal those of the shrunk spec. Text models:
  `text_keep_masks`.
  """
  if _is_text(spec):
    return _text().text_keep_masks(spec, keep)
  idx = keep_indices(spec, keep)
  g = _graph.graph(spec)
  params_abs, _ = models.param_shapes(spec)
  shapes = _shape_dict(spec)

  def vector(width, kept):
    v = np.zeros(width, bool)
    v[kept] = True
    return v

  out: dict[tuple[str, ...], np.ndarray] = {}
  for layer in g.layers:
    kshape = shapes[layer.path + ('kernel',)]
    rows = vector(kshape[-2], _input_indices(layer, idx))
    cols = (vector(kshape[-1], idx[layer.out_group]) if layer.out_group is not None
            else np.ones(kshape[-1], bool))
    out[layer.path + ('kernel',)] = (rows[:, None] & cols[None, :]).reshape(
        (1,) * (len(kshape) - 2) + kshape[-2:])
    if layer.path + ('bias',) in shapes:
      out[layer.path + ('bias',)] = cols
  for grp in g.groups:
    for norm in grp.norms:
      for leaf in ('scale', 'bias'):
        out[norm + (leaf,)] = vector(grp.width, idx[grp.name])
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_abs)
  return jax.tree.unflatten(treedef, [jnp.asarray(out.get(_path_keys(p), np.ones((), bool)))
                                      for p, _ in flat])


def group_l1(spec, params: Params) -> dict[str, np.ndarray]:
  """Per-channel L1 norm of each group's filters: sum of |kernel| over all axes but the last.

  A coupled group (ResNet stream) sums the L1 norms of all its producers.
  Biases are not included (as the ASP code and Li et al. 2017).

  Text models: `text_group_l1` (per LSTM unit, attention head, FFN unit).

  Returns:
    {group name: float64 [width]}.
  """
  if _is_text(spec):
    return _text().text_group_l1(spec, params)
  result = {}
  for grp in groups(spec):
    total = np.zeros(grp.width)
    for producer in grp.producers:
      node = params
      for k in producer:
        node = node[k]
      kernel = np.abs(np.asarray(node['kernel'], np.float64))
      total += kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)
    result[grp.name] = total
  return result
