"""Structured surgery for the text models: LSTM units, attention heads, FFN units, blocks.

`text_shrink(spec, params, keep, drop_blocks=...)` returns the smaller spec and
the sliced params (and any params-shaped optimizer state), as `shrink` does for
the CNNs; `text_keep_masks` gives the equivalent masks on the dense model.
Contract (tests/structured/test_text_shrink.py): the shrunk model's outputs
equal the dense model's outputs with `text_keep_masks(spec, keep, drop_blocks)`
applied, and so does the accounting (`accounting.flops`, `param_count`).

Groups (`text_groups`), the prunable units and what removing one takes:
  * `'lstm_{l}'` (LSTMSpec), width H: unit j's four gate columns
    (`g * H + j`, g = i, f, g, o) of lstm_l's kernel, recurrent_kernel and bias,
    its recurrent_kernel row, and its input row of the next layer (lstm_{l+1}
    kernel, or the head). A masked unit has all gates 0, so c = h = 0 forever.
  * `'block_{l}/attn'` (TransformerSpec), width num_heads: head n's query, key
    and value columns (`n * head_dim + e`, kernels and biases) and its rows of
    the out kernel. A masked head attends uniformly to zero values.
  * `'block_{l}/ffn'`, width ffn_width: unit j's dense_0 column and bias, and its
    dense_1 row (GELU(0) = 0).
  Heads and FFN units may all be removed (the branch leaves its out / dense_1
  bias); an LSTM layer keeps at least one unit.
  * Whole transformer blocks (`drop_blocks`, names 'block_{l}'): the block is
    deleted and the later ones renumbered. With every parameter of the block
    masked (LayerNorm scale and bias included) both branches output exactly 0,
    so the masked block is the identity, as the deleted one.

`keep` is a tree keyed by group (nested {'block_0': {'attn': ...}} or flat
{'block_0/attn': ...}) whose leaves are a bool vector [width] (True = keep) or
an int vector of kept indices; groups not named keep everything. Host-side
numpy slicing only; never jit it.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import models
from fedjax_prune.structured import _shrink
from fedjax_prune.structured._graph import Group
from fedjax_prune.types import Masks, Params, PyTree


def _check_spec(spec) -> None:
  if not isinstance(spec, models.TEXT_SPECS):
    raise ValueError(f'spec must be an LSTMSpec or TransformerSpec, got {type(spec).__name__}')


def text_groups(spec: models.TextSpec) -> tuple[Group, ...]:
  """The prunable groups of a text model, in forward order (module docstring).

  `Group.kind` is 'lstm_unit', 'head' or 'ffn_unit'; `producers` are the layers
  whose output columns hold the group (their kernels give `text_group_l1`).
  """
  _check_spec(spec)
  if isinstance(spec, models.LSTMSpec):
    return tuple(Group(f'lstm_{l}', ((f'lstm_{l}',),), (), h, 'lstm_unit')
                 for l, h in enumerate(spec.hidden))
  out = []
  for l, (heads, _, ffn) in enumerate(spec.blocks):
    b = f'block_{l}'
    out.append(Group(f'{b}/attn', tuple((b, 'attn', n) for n in ('query', 'key', 'value')), (),
                     heads, 'head'))
    out.append(Group(f'{b}/ffn', ((b, 'ffn', 'dense_0'),), (), ffn, 'ffn_unit'))
  return tuple(out)


def text_keep_indices(spec: models.TextSpec, keep: Any) -> dict[str, np.ndarray]:
  """Validated kept indices (sorted int arrays) for every group of `spec`.

  Raises:
    ValueError: naming the entry when it names no group, has the wrong length,
      holds out-of-range or repeated indices, or keeps no unit of an LSTM layer.
  """
  by_name = {g.name: g for g in text_groups(spec)}
  chosen = {}
  flat = jax.tree_util.tree_flatten_with_path(keep)[0] if keep is not None else []
  for path, leaf in flat:
    name = '/'.join(_shrink._path_keys(path))
    grp = by_name.get(name)
    if grp is None:
      raise ValueError(f'keep[{name!r}] names no prunable group of {type(spec).__name__}; '
                       f'groups: {sorted(by_name)}')
    idx = _shrink.keep_entry_indices(name, leaf, grp.width, name, allow_empty=True,
                                     caller='text_shrink')
    if idx.size == 0 and grp.kind == 'lstm_unit':
      raise ValueError(f'keep[{name!r}] keeps no unit of LSTM layer {name!r}; keep at least one')
    chosen[name] = idx
  return {g.name: chosen.get(g.name, np.arange(g.width)) for g in text_groups(spec)}


def _check_drop(spec: models.TextSpec, drop_blocks: Iterable[str]) -> set[str]:
  drop = set(drop_blocks)
  if not drop:
    return drop
  if not isinstance(spec, models.TransformerSpec):
    raise ValueError(f'drop_blocks needs a TransformerSpec, got {type(spec).__name__}')
  names = [f'block_{l}' for l in range(len(spec.blocks))]
  unknown = sorted(drop - set(names))
  if unknown:
    raise ValueError(f'drop_blocks: unknown blocks {unknown} (spec has {names})')
  return drop


def _gate_columns(units: np.ndarray, h: int) -> np.ndarray:
  """Columns `g * H + j` of units j, gate-major (i, f, g, o), as the kernels store them."""
  return np.concatenate([g * h + units for g in range(4)])


def _head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
  """Columns `n * head_dim + e` of heads n."""
  return (heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def _plan(spec: models.TextSpec, idx: dict[str, np.ndarray]
          ) -> dict[tuple[str, ...], list[tuple[int, np.ndarray]]]:
  """leaf path -> [(axis counted from the end, kept indices)]."""
  plan: dict[tuple[str, ...], list[tuple[int, np.ndarray]]] = {}
  if isinstance(spec, models.LSTMSpec):
    rows = None  # kept inputs of the current layer (None: all)
    for l, h in enumerate(spec.hidden):
      units = idx[f'lstm_{l}']
      cols = _gate_columns(units, h)
      kernel = [(-1, cols)] + ([(-2, rows)] if rows is not None else [])
      plan[(f'lstm_{l}', 'kernel')] = kernel
      plan[(f'lstm_{l}', 'recurrent_kernel')] = [(-1, cols), (-2, units)]
      plan[(f'lstm_{l}', 'bias')] = [(-1, cols)]
      rows = units
    plan[('head', 'kernel')] = [(-2, rows)]
    return plan
  for l, (_, head_dim, _) in enumerate(spec.blocks):
    b = f'block_{l}'
    cols = _head_columns(idx[f'{b}/attn'], head_dim)
    for name in ('query', 'key', 'value'):
      plan[(b, 'attn', name, 'kernel')] = [(-1, cols)]
      plan[(b, 'attn', name, 'bias')] = [(-1, cols)]
    plan[(b, 'attn', 'out', 'kernel')] = [(-2, cols)]
    units = idx[f'{b}/ffn']
    plan[(b, 'ffn', 'dense_0', 'kernel')] = [(-1, units)]
    plan[(b, 'ffn', 'dense_0', 'bias')] = [(-1, units)]
    plan[(b, 'ffn', 'dense_1', 'kernel')] = [(-2, units)]
  return plan


def _resize(spec: models.TextSpec, idx: dict[str, np.ndarray], drop: set[str]):
  if isinstance(spec, models.LSTMSpec):
    return models.LSTMSpec(vocab_size=spec.vocab_size, seq_len=spec.seq_len,
                           embed_dim=spec.embed_dim,
                           hidden=tuple(int(idx[f'lstm_{l}'].size) for l in range(len(spec.hidden))))
  blocks = tuple((int(idx[f'block_{l}/attn'].size), head_dim, int(idx[f'block_{l}/ffn'].size))
                 for l, (_, head_dim, _) in enumerate(spec.blocks) if f'block_{l}' not in drop)
  return models.TransformerSpec(vocab_size=spec.vocab_size, seq_len=spec.seq_len,
                                d_model=spec.d_model, blocks=blocks)


def _renames(spec: models.TextSpec, drop: set[str]) -> dict[str, str]:
  if not isinstance(spec, models.TransformerSpec):
    return {}
  kept = [f'block_{l}' for l in range(len(spec.blocks)) if f'block_{l}' not in drop]
  return {old: f'block_{new}' for new, old in enumerate(kept)}


def _rename(tree: dict, renames: dict[str, str], drop: set[str]) -> dict:
  """A params-structured dict with dropped blocks removed and the later ones renumbered."""
  out = {}
  for name, value in tree.items():
    if name in drop:
      continue
    out[renames.get(name, name)] = value
  return out


def text_slice_like(tree: PyTree, spec: models.TextSpec, keep: Any, *,
                    drop_blocks: Iterable[str] = ()) -> PyTree:
  """Slices every params-shaped subtree of `tree` (optimizer moments, masks, stacked
  per-client copies with leading axes) as `text_shrink` slices the params; other
  leaves (step counts) are returned unchanged. See `structured.slice_like`."""
  _check_spec(spec)
  drop = _check_drop(spec, drop_blocks)
  plan = _plan(spec, text_keep_indices(spec, keep))
  params_abs, _ = models.param_shapes(spec)
  structure = jax.tree.structure(params_abs)
  shapes = {_shrink._path_keys(p): tuple(l.shape)
            for p, l in jax.tree_util.tree_flatten_with_path(params_abs)[0]}
  renames = _renames(spec, drop)
  is_target = lambda x: not isinstance(x, (jax.Array, np.ndarray)) and (
      _shrink._safe_structure(x) == structure)

  def visit(x):
    return _rename(_shrink._apply_plan(x, plan, shapes), renames, drop) if is_target(x) else x

  return jax.tree.map(visit, tree, is_leaf=is_target)


def text_shrink(spec: models.TextSpec, params: Params, keep: Any, *,
                drop_blocks: Iterable[str] = (), opt_state: Optional[PyTree] = None
                ) -> _shrink.Shrunk:
  """Removes the units / heads not in `keep` and the blocks in `drop_blocks`.

  Args:
    spec: an LSTMSpec or TransformerSpec.
    params: its params (concrete arrays).
    keep: kept units per group (module docstring).
    drop_blocks: transformer block names ('block_{l}') to delete.
    opt_state: optional optimizer (or per-client) state; every params-shaped
      subtree is sliced alike (`text_slice_like`).

  Returns:
    Shrunk(spec, params, batch_stats={}, opt_state): `models.make_apply(new_spec)`
    runs the new params; its outputs equal the dense model's with
    `text_keep_masks(spec, keep, drop_blocks=drop_blocks)` applied.

  Example:
    >>> import jax, numpy as np
    >>> from fedjax_prune import models, structured
    >>> spec = models.shakespeare_transformer(num_layers=2, d_model=16, num_heads=4)
    >>> _, params, _ = models.build(spec, jax.random.key(0))
    >>> out = structured.text_shrink(spec, params, {'block_0/attn': np.array([0, 3])},
    ...                              drop_blocks=['block_1'])
    >>> out.spec.blocks, out.params['block_0']['attn']['out']['kernel'].shape
    (((2, 4, 64),), (8, 16))
  """
  _check_spec(spec)
  drop = _check_drop(spec, drop_blocks)
  idx = text_keep_indices(spec, keep)
  params_abs, _ = models.param_shapes(spec)
  _shrink._check_tree(params, params_abs, 'params')
  new_spec = _resize(spec, idx, drop)
  shapes = {_shrink._path_keys(p): tuple(l.shape)
            for p, l in jax.tree_util.tree_flatten_with_path(params_abs)[0]}
  new_params = _rename(_shrink._apply_plan(params, _plan(spec, idx), shapes),
                       _renames(spec, drop), drop)
  _shrink._check_tree(new_params, models.param_shapes(new_spec)[0], 'shrunk params')
  new_opt = (None if opt_state is None
             else text_slice_like(opt_state, spec, keep, drop_blocks=drop_blocks))
  return _shrink.Shrunk(new_spec, new_params, {}, new_opt)


def text_keep_masks(spec: models.TextSpec, keep: Any, *, drop_blocks: Iterable[str] = ()
                    ) -> Masks:
  """Bool masks (params structure) equivalent to `text_shrink(spec, ., keep, drop_blocks)`.

  Sliced axes become kept-index vectors (a kernel's mask is their outer
  product, [in, out]); leaves of dropped blocks are `False` scalars; the rest
  `True` scalars. `masks.apply` of them on the dense params gives the shrunk
  model's outputs, and `accounting.flops` / `param_count` of (spec, masks) equal
  those of the shrunk spec.
  """
  _check_spec(spec)
  drop = _check_drop(spec, drop_blocks)
  plan = _plan(spec, text_keep_indices(spec, keep))
  params_abs, _ = models.param_shapes(spec)
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_abs)[0]:
    keys = _shrink._path_keys(path)
    if keys[0] in drop:
      leaves.append(jnp.zeros((), bool))
      continue
    cuts = plan.get(keys)
    if not cuts:
      leaves.append(jnp.ones((), bool))
      continue
    mask = np.ones(leaf.shape, bool)
    for axis, kept in cuts:
      vector = np.zeros(leaf.shape[axis], bool)
      vector[kept] = True
      shape = [1] * len(leaf.shape)
      shape[axis] = leaf.shape[axis]
      mask &= vector.reshape(shape)
    leaves.append(jnp.asarray(mask))
  return jax.tree.unflatten(jax.tree.structure(params_abs), leaves)


def text_group_l1(spec: models.TextSpec, params: Params, *, xp: Any = np
                  ) -> dict[str, np.ndarray]:
  """Per-unit L1 norm of each group's incoming weights (kernels only, as `group_l1`).

  LSTM unit j: |kernel| + |recurrent_kernel| summed over its 4 gate columns; head n:
  |query|, |key| and |value| kernels summed over its head_dim columns; FFN unit j:
  |dense_0 kernel| over its column.

  Args:
    xp: `np` (host, float64: the server's scores) or `jnp` (jittable, float32: a client
      scores its own model inside the round, `pruning.client_votes.filter_group_l1`).

  Returns:
    {group name: [width]} float64 (np) or float32 (jnp).
  """
  _check_spec(spec)
  dtype = np.float64 if xp is np else jnp.float32
  column_l1 = lambda kernel: xp.abs(xp.asarray(kernel, dtype)).sum(axis=0)
  out = {}
  if isinstance(spec, models.LSTMSpec):
    for l, h in enumerate(spec.hidden):
      p = params[f'lstm_{l}']
      total = column_l1(p['kernel']) + column_l1(p['recurrent_kernel'])
      out[f'lstm_{l}'] = total.reshape(4, h).sum(axis=0)
    return out
  for l, (heads, head_dim, _) in enumerate(spec.blocks):
    attn = params[f'block_{l}']['attn']
    total = sum(column_l1(attn[n]['kernel']) for n in ('query', 'key', 'value'))
    out[f'block_{l}/attn'] = xp.asarray(total).reshape(heads, head_dim).sum(axis=1)
    out[f'block_{l}/ffn'] = column_l1(params[f'block_{l}']['ffn']['dense_0']['kernel'])
  return out
