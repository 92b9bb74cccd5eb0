"""Width (and depth) submodels over a full-size ResNet, shared by HeteroFL, FedRolex, ScaleFL.

The methods themselves are in `heterofl.py`, `fedrolex.py` and `scalefl.py`; this
module is their common machinery (`width_method`).

A width-r submodel keeps k = ceil(r * C) of the C channels of every hidden
layer: HeteroFL the first k (a static prefix), FedRolex a window rolled with the
round, indices {(t + j) mod C : j < k} in round t (evaluated on the window of
`eval_window`, see `fedrolex`). The input image channels and
the classifier outputs are never sliced. The submodel is expressed as channel
*masks* over the full-size parameters (a kernel entry [.., i, o] is kept iff
input channel i and output channel o are; BN scale and bias are masked too, so a
dropped channel outputs exactly 0 under static BN). Its outputs equal the
sliced model's, and every client, whatever its width, runs the same compiled
program: the "masks over the full-size model" strategy, the default. The option
`grouped=GroupedExecution(spec, apply_for)` trains each level's genuinely smaller
model instead (one program per level; section "grouped execution" below).

Layers whose widths are equal get the same index set, so the residual-stream
channels added together in a ResNet stay aligned.

Ownership (which coordinates a client holds) drives the server's partial
averaging, as in HeteroFL's `combine`: each coordinate is averaged over the
clients holding it.

Scaler (HeteroFL): multiply features by 1/r during training only. HeteroFL puts
it before every BatchNorm, where batch statistics cancel it exactly (up to BN's
epsilon); here it scales the input of the classifier(s) instead (option
`scaler`, inferred placement), implemented as classifier kernel / r, and so it is
applied identically when a width-r submodel is evaluated (`submodel`): an earlier
version scaled in training only, so an evaluated width-1/8 model's logits were r times
its trained signal plus the head bias (8x too influential), which collapsed FedRolex at
1/64 to one class (docs/results/fiarse.md).

ScaleFL adds depth: a level is (width r, depth d = number of stages); the
client trains stages 1..d and the exits up to d, with self-distillation from
its deepest exit to the earlier ones (inferred details, all options).

Parameter naming: the ResNet names of `models` (stem, stage{s}_block{b}, head,
exit{s}). Other models: pass `input_keys` / `output_keys` regexes.

Text models (pass `spec=` an LSTMSpec or TransformerSpec; `text_width_masks`): the
hidden widths are the structured groups of `structured.text_groups`, and a width-r
submodel keeps ceil(r W) units of every group:
  * transformer: ceil(r n) whole attention heads per block (a head's query/key/value
    columns and its rows of the out projection, coupled) and ceil(r F) FFN units
    (dense_0 column + dense_1 row). The residual width d_model, head_dim, the token
    and position embeddings, every LayerNorm and the output head stay FULL. Why
    d_model is not scaled (HeteroFL's own WikiText-2 transformer, `src/fed.py`
    `split_model`, scales the embedding size and every head's dim with the heads'
    number fixed): that model is sliced into a genuinely smaller network, while here
    the submodel is masks over the full-size one, and a LayerNorm over a masked
    residual stream normalises over the zeroed channels too, so the masked model
    would equal no smaller transformer; a masked head_dim would keep the full
    1/sqrt(head_dim) scale. Whole heads and FFN units keep the contract every width
    method has here: the masked model's outputs equal `structured.text_shrink`'s
    smaller TransformerSpec (tests/pruning/test_text_methods.py), so accounting of
    the masks is the smaller model's. Consequence: the sliced parameters scale
    like r (not r^2, d_model fixed), so the default width of a capacity level is
    r = capacity for a transformer (`text_widths`).
  * LSTM: ceil(r H) units of every layer (their 4 gate columns, recurrent row and
    next-layer input row); r = sqrt(capacity) by default, as the CNNs (the
    recurrent and deeper input kernels scale like r^2).
  FedRolex rolls the window over each group's units (heads, FFN units, LSTM units)
  with the round. Scaler: the rule above for the CNN classifier, generalised: every
  kernel whose input is a sliced width and whose output a full one is scaled by 1/r
  -- the transformer's attention out and FFN dense_1 kernels (the branches the
  residual stream adds), the LSTM's head kernel.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import models, structured
from fedjax_prune import tree as tree_lib
from fedjax_prune.masks import _ops as masks_lib
from fedjax_prune.federated import (ClientInfo, ClientOutput, FedAlgorithm, LocalSchedule,
                                    make_local_train, softmax_cross_entropy)
from fedjax_prune.masks._filters import path_str
from fedjax_prune.models._text import check_params as _text_check_params
from fedjax_prune.pruning import _hetero
from fedjax_prune.pruning._hetero import HeteroMethod, HeteroState
from fedjax_prune.structured._graph import resize as _resize_spec
from fedjax_prune.types import Masks, Params, PyTree

EVAL_WINDOWS = ("extraction", "last_round", "prefix")  # FedRolex: which window a level is evaluated on
INPUT_KEYS = r"^stem$"              # top-level keys whose kernel input dim is the image
OUTPUT_KEYS = r"^(head|exit\d+)$"   # top-level keys whose output dim is the classes
NO_KEYS = r"(?!)"                   # matches no key (no flattened-input layer)
_STAGE = re.compile(r"^stage(\d+)_block\d+$")
_EXIT = re.compile(r"^exit(\d+)$")


def keep_count(size: int, ratio) -> jax.Array:
  """k = ceil(ratio * size), clipped to [1, size] (traceable in `ratio`)."""
  k = jnp.ceil(jnp.asarray(ratio, jnp.float32) * size - 1e-4).astype(jnp.int32)
  return jnp.clip(k, 1, size)


def channel_keep(size: int, ratio, offset=0) -> jax.Array:
  """[size] bool: the kept channels, {(offset + j) mod size : j < ceil(ratio * size)}.

  offset 0 is HeteroFL's prefix; offset = round index is FedRolex's rolling window.
  """
  pos = jnp.mod(jnp.arange(size, dtype=jnp.int32) - jnp.asarray(offset, jnp.int32), size)
  return pos < keep_count(size, ratio)


def width_masks(params: Params, ratio, offset=0, *, input_keys: str = INPUT_KEYS,
                output_keys: str = OUTPUT_KEYS, flatten_keys: str = NO_KEYS) -> Masks:
  """Ownership masks of the width-`ratio` submodel (bool, broadcastable to params).

  Args:
    params: full-size parameters (arrays or ShapeDtypeStructs).
    ratio: [] width ratio in (0, 1] (may be traced).
    offset: [] window offset (0 = prefix; the round index for FedRolex).
    input_keys: regex of top-level keys whose kernels read the (unsliced) input.
    output_keys: regex of top-level keys whose outputs are the (unsliced) classes.
    flatten_keys: regex of top-level keys whose kernel input is a flattened [H, W, C]
      feature map (the LEAF CNN's first dense layer): its channels are those of the last
      conv kernel (4-D leaf, tree order), kept as that conv's outputs, at every position.

  Returns:
    Masks: kernels [..., ci, co] get [1, .., ci, co] masks, 1-D leaves [C] masks.
  """
  inp, out, flat = re.compile(input_keys), re.compile(output_keys), re.compile(flatten_keys)
  conv_outs = [np.shape(p)[-1] for p in jax.tree.leaves(params) if len(np.shape(p)) == 4]

  def keep_inputs(top, ci):
    if inp.search(top):
      return jnp.ones((ci,), bool)
    if flat.search(top):
      if not conv_outs or ci % conv_outs[-1]:
        raise ValueError(f"flatten_keys matched {top!r}, whose input size {ci} is not a multiple "
                         f"of the last conv's output channels {conv_outs[-1:] or 'none'}")
      # Flattening [H, W, C] puts the channel fastest: input i is channel i mod C.
      return jnp.tile(channel_keep(conv_outs[-1], ratio, offset), ci // conv_outs[-1])
    return channel_keep(ci, ratio, offset)

  def leaf(path, p):
    top = path_str(path).split("/")[0]
    shape = np.shape(p)
    is_out = bool(out.search(top))
    if len(shape) >= 2:
      ci, co = shape[-2], shape[-1]
      keep_in = keep_inputs(top, ci)
      keep_out = jnp.ones((co,), bool) if is_out else channel_keep(co, ratio, offset)
      m = keep_in[:, None] & keep_out[None, :]
      return m.reshape((1,) * (len(shape) - 2) + (ci, co))
    if len(shape) == 1:
      return jnp.ones(shape, bool) if is_out else channel_keep(shape[0], ratio, offset)
    return jnp.ones((), bool)

  return jax.tree_util.tree_map_with_path(leaf, params)


# ----------------------------------------------------------------------------- text models


def _text_axes(spec) -> dict[tuple[str, ...], list[tuple[int, str, np.ndarray]]]:
  """Leaf path -> [(axis counted from the end, group name, owning unit of every index on
  that axis)] for the leaves `structured.text_shrink` slices (its `_plan`, by unit)."""
  axes: dict[tuple[str, ...], list[tuple[int, str, np.ndarray]]] = {}
  if isinstance(spec, models.LSTMSpec):
    prev = None  # (group, width) feeding the current layer
    for l, h in enumerate(spec.hidden):
      g = f"lstm_{l}"
      cols = (-1, g, np.arange(4 * h) % h)  # gate-major columns gate * H + unit
      rows = [] if prev is None else [(-2, prev[0], np.arange(prev[1]))]
      axes[(g, "kernel")] = [cols] + rows
      axes[(g, "recurrent_kernel")] = [cols, (-2, g, np.arange(h))]
      axes[(g, "bias")] = [cols]
      prev = (g, h)
    axes[("head", "kernel")] = [(-2, prev[0], np.arange(prev[1]))]
    return axes
  for l, (heads, head_dim, ffn) in enumerate(spec.blocks):
    b, attn, units = f"block_{l}", f"block_{l}/attn", np.arange(ffn)
    head_of = np.arange(heads * head_dim) // head_dim  # columns head * head_dim + e
    for name in ("query", "key", "value"):
      axes[(b, "attn", name, "kernel")] = [(-1, attn, head_of)]
      axes[(b, "attn", name, "bias")] = [(-1, attn, head_of)]
    axes[(b, "attn", "out", "kernel")] = [(-2, attn, head_of)]
    axes[(b, "ffn", "dense_0", "kernel")] = [(-1, f"{b}/ffn", units)]
    axes[(b, "ffn", "dense_0", "bias")] = [(-1, f"{b}/ffn", units)]
    axes[(b, "ffn", "dense_1", "kernel")] = [(-2, f"{b}/ffn", units)]
  return axes


def _check_text_spec(spec) -> None:
  if not isinstance(spec, models.TEXT_SPECS):
    raise ValueError(f"spec must be an LSTMSpec or TransformerSpec, got {type(spec).__name__}")


def text_group_masks(spec, keep: dict) -> Masks:
  """Masks (params structure) keeping the units `keep` names, traceable in `keep`.

  Args:
    spec: an LSTMSpec or TransformerSpec.
    keep: {group name (`structured.text_groups`): [width] bool}, every group named
      (may be traced).

  Returns:
    Bool masks broadcastable to the params: a sliced kernel [in, out] gets [in, out],
    [1, out] or [in, 1], a sliced bias [out]; every other leaf `()` True. On the host
    they broadcast to `structured.text_keep_masks(spec, keep)`, so the masked model's
    outputs equal `text_shrink`'s.
  """
  _check_text_spec(spec)
  names = {g.name: g.width for g in structured.text_groups(spec)}
  if set(keep) != set(names):
    raise ValueError(f"keep must name every group of the spec {sorted(names)}, got {sorted(keep)}")
  for name, width in names.items():
    if jnp.shape(keep[name]) != (width,):
      raise ValueError(f"keep[{name!r}] has shape {jnp.shape(keep[name])}, expected ({width},)")
  axes = _text_axes(spec)

  def leaf(path, p):
    cuts = axes.get(tuple(path_str(path).split("/")))
    if not cuts:
      return jnp.ones((), bool)
    ndim = len(p.shape)
    out_shape = [1] * ndim
    m = jnp.ones((), bool)
    for axis, group, unit_of in cuts:
      shape = [1] * ndim
      shape[axis] = out_shape[axis] = p.shape[axis]
      m = m & jnp.asarray(keep[group], bool)[unit_of].reshape(shape)
    return jnp.broadcast_to(m, tuple(out_shape))

  return jax.tree_util.tree_map_with_path(leaf, models.param_shapes(spec)[0])


def text_width_masks(spec, ratio, offset=0) -> Masks:
  """Ownership masks of the width-`ratio` submodel of a text model (module docstring).

  Every group of `structured.text_groups(spec)` (LSTM units, attention heads, FFN
  units) of width W keeps `channel_keep(W, ratio, offset)`: ceil(ratio W) units, at
  least 1 unless W = 0; offset 0 the prefix (HeteroFL), the round index a rolling
  window (FedRolex).

  Args:
    spec: an LSTMSpec or TransformerSpec.
    ratio: [] width ratio in (0, 1] (may be traced).
    offset: [] window offset (may be traced).

  Returns:
    `text_group_masks` of those units.

  Example:
    >>> import numpy as np
    >>> from fedjax_prune import models
    >>> from fedjax_prune.pruning import heterofl
    >>> spec = models.shakespeare_transformer(num_layers=1, d_model=16, num_heads=4)
    >>> m = heterofl.text_width_masks(spec, 0.5)        # 2 of 4 heads, 32 of 64 FFN units
    >>> np.flatnonzero(m['block_0']['attn']['out']['kernel'][:, 0]).tolist()  # head_dim 4
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> int(m['block_0']['ffn']['dense_0']['bias'].sum()), bool(m['embed']['embedding'])
    (32, True)
  """
  _check_text_spec(spec)
  return text_group_masks(spec, {g.name: channel_keep(g.width, ratio, offset)
                                 for g in structured.text_groups(spec)})


def _text_scaled_leaves(spec) -> set[tuple[str, ...]]:
  """Kernels whose input is a sliced width and whose output is full (the scaler's)."""
  return {path for path, cuts in _text_axes(spec).items()
          if path[-1] == "kernel" and {axis for axis, _, _ in cuts} == {-2}}


def _scale_text(params: Params, factor, scaled: set) -> Params:
  def leaf(path, p):
    if tuple(path_str(path).split("/")) in scaled:
      return p * jnp.asarray(factor, p.dtype)
    return p
  return jax.tree_util.tree_map_with_path(leaf, params)


def text_widths(spec, capacities: Sequence[float]) -> tuple[float, ...]:
  """The default width ratio of each capacity level for a text model (module docstring):
  r = capacity for a transformer (d_model stays full, so the sliced parameters scale
  like r), r = sqrt(capacity) for an LSTM (as `sqrt_widths`)."""
  _check_text_spec(spec)
  caps = _hetero.check_capacities(capacities)
  return caps if isinstance(spec, models.TransformerSpec) else sqrt_widths(caps)


def leaf_stages(params: Params) -> PyTree:
  """Static int tree: the stage of every leaf (stem 0, stage{s}_* s, exit{s} s, head = last)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  tops = [path_str(p).split("/")[0] for p, _ in flat]
  stages = [int(m.group(1)) for t in tops if (m := _STAGE.match(t))]
  last = max(stages) if stages else 1
  out = []
  for t in tops:
    m = _STAGE.match(t) or _EXIT.match(t)
    out.append(int(m.group(1)) if m else (0 if t == "stem" else last))
  return jax.tree.unflatten(jax.tree.structure(params), out)


def depth_masks(params: Params, depth) -> Masks:
  """`()` bool per leaf: True where the leaf's stage <= depth (traceable in depth)."""
  d = jnp.asarray(depth, jnp.int32)
  return jax.tree.map(lambda s: jnp.asarray(s, jnp.int32) <= d, leaf_stages(params))


def _scale_outputs(params: Params, factor, output_keys: str) -> Params:
  """Classifier kernels * factor (the Scaler on the classifier input)."""
  out = re.compile(output_keys)

  def leaf(path, p):
    keys = path_str(path).split("/")
    if out.search(keys[0]) and keys[-1] == "kernel":
      return p * jnp.asarray(factor, p.dtype)
    return p

  return jax.tree_util.tree_map_with_path(leaf, params)


def sqrt_widths(capacities: Sequence[float]) -> tuple[float, ...]:
  """Width ratio r = sqrt(capacity): a width-r model has ~r^2 of the parameters."""
  return tuple(math.sqrt(c) for c in capacities)


def _submodel_apply(apply_fn, masks, ratio, scaler: bool, output_keys: str,
                    scale_fn: Callable | None = None):
  """A client's forward pass of its width-`ratio` submodel (what `submodel` evaluates).

  `scale_fn(params, factor)` is the scaler (default: the classifier kernels `output_keys`)."""
  if scale_fn is None:
    scale_fn = lambda p, factor: _scale_outputs(p, factor, output_keys)

  def apply(params, batch_stats, x, *, train, example_mask=None):
    p = masks_lib.apply(params, masks)
    if scaler:
      p = scale_fn(p, 1.0 / ratio)
    return apply_fn(p, batch_stats, x, train=train, example_mask=example_mask)
  return apply


# ----------------------------------------------------------------------------- grouped execution
#
# Per-capacity-group execution (`GroupedExecution`): a client of level l trains the level's
# genuinely smaller model (its width-r channels gathered out of the full-size params, and for
# ScaleFL only its first d stages), and its update is scattered back to full shape, so the
# server's partial averaging is the masked strategy's. The gathered channel order is the
# window's, (offset + j) mod C for j < k, on every axis of width C (HeteroFL: offset 0, the
# prefix); the same order on every layer is a consistent permutation of the kept channels,
# so the sliced model computes what the masked full-size model computes.


class GroupedExecution(NamedTuple):
  """Per-capacity-group execution of a width method (`heterofl(grouped=...)`).

  Each capacity level trains its really-smaller submodel: one traced program per level
  inside the round (a `lax.switch` on the client's level), instead of every client running
  the full-size model under its level's masks (the default, `grouped=None`). The new
  global params equal the masked strategy's up to float summation order.

  It pays off where clients run one after another (`federated.Sequential()`, the CPU
  default): each client runs only its level's program. Under `federated.Vmap()` /
  `Chunked(n)` JAX turns the switch into a select over every level's program, so each
  client pays for all levels (about 1.33x the masked cost for capacities {1, 1/4, 1/16,
  1/64}): keep the default there.

  Attributes:
    spec: the full-size model's spec (MLPSpec, ConvNetSpec or ResNetSpec; ScaleFL: the
      backbone ResNetSpec its early-exit model was built from).
    apply_for: `apply_for(level_spec) -> apply_fn` of a level's sliced model (e.g.
      `lambda s: models.make_apply(s)`); ScaleFL: `apply_for(level_spec, exit_stages) ->
      apply_fn` of the early-exit model of the level's width-sliced, depth-truncated spec
      (`models.make_early_exit_apply`).
  """
  spec: Any
  apply_for: Callable


def static_keep_count(size: int, ratio: float) -> int:
  """`keep_count` as a Python int for a static ratio (same float32 arithmetic)."""
  k = np.ceil(np.float32(ratio) * np.float32(size) - np.float32(1e-4))
  return int(np.clip(k, 1, size))


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(path_str(p).split("/")): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for keys, x in flat.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = x
  return out


def _width_cuts(params: Params, input_keys: str, output_keys: str, flatten_keys: str
                ) -> dict[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
  """Leaf path -> ((axis from the end, channels C, positions P), ...): the axes `width_masks`
  slices (input index p * C + c for a flattened [H, W, C] input), the same rule."""
  inp, out, flat = re.compile(input_keys), re.compile(output_keys), re.compile(flatten_keys)
  conv_outs = [np.shape(p)[-1] for p in jax.tree.leaves(params) if len(np.shape(p)) == 4]
  cuts = {}
  for keys, p in _flat(params).items():
    top, shape, c = keys[0], np.shape(p), []
    if len(shape) >= 2:
      ci, co = shape[-2], shape[-1]
      if flat.search(top):
        if not conv_outs or ci % conv_outs[-1]:
          raise ValueError(f"flatten_keys matched {top!r}, whose input size {ci} is not a multiple "
                           f"of the last conv's output channels {conv_outs[-1:] or 'none'}")
        c.append((-2, conv_outs[-1], ci // conv_outs[-1]))
      elif not inp.search(top):
        c.append((-2, ci, 1))
      if not out.search(top):
        c.append((-1, co, 1))
    elif len(shape) == 1 and not out.search(top):
      c.append((-1, shape[0], 1))
    cuts[keys] = tuple(c)
  return cuts


def _window_indices(size: int, positions: int, ratio: float, offset) -> jax.Array:
  """The kept input/output indices of one axis, in window order (module section comment)."""
  k = static_keep_count(size, ratio)
  if isinstance(offset, int):  # static (HeteroFL, ScaleFL): constant indices
    win = (offset + np.arange(k)) % size
    return jnp.asarray((np.arange(positions)[:, None] * size + win[None, :]).reshape(-1), jnp.int32)
  win = jnp.mod(jnp.asarray(offset, jnp.int32) + jnp.arange(k, dtype=jnp.int32), size)
  return (jnp.arange(positions, dtype=jnp.int32)[:, None] * size + win[None, :]).reshape(-1)


class _LevelPlan(NamedTuple):
  """How a level's sliced params come out of (and go back into) the full-size params.

  Attributes:
    sources: sliced-model leaf path -> full-size leaf path (ScaleFL's exit{d} -> head).
    cuts: full-size leaf path -> its sliced axes (`_width_cuts`).
    ratio: the level's width ratio.
  """
  sources: dict
  cuts: dict
  ratio: float

  def gather(self, params: Params, offset) -> Params:
    """The level's sliced params [..., k_in, k_out] out of the full-size `params`."""
    flat = _flat(params)
    out = {}
    for dst, src in self.sources.items():
      x = flat[src]
      for axis, size, positions in self.cuts[src]:
        idx = _window_indices(size, positions, self.ratio, offset)
        x = jnp.take(x, idx, axis=axis, mode="clip", unique_indices=True, indices_are_sorted=False)
      out[dst] = x
    return _nest(out)

  def scatter(self, sliced: Params, like: Params, offset) -> Params:
    """A full-size tree shaped like `like`: `sliced` at its coordinates, 0 elsewhere."""
    flat_like, flat_sliced = _flat(like), _flat(sliced)
    out = {keys: jnp.zeros_like(x) for keys, x in flat_like.items()}
    for dst, src in self.sources.items():
      x, cuts = flat_sliced[dst], self.cuts[src]
      idx = {axis: _window_indices(size, positions, self.ratio, offset)
             for axis, size, positions in cuts}
      if -2 in idx and -1 in idx:
        where = (Ellipsis, idx[-2][:, None], idx[-1][None, :])
      elif -2 in idx:
        where = (Ellipsis, idx[-2], slice(None))
      elif -1 in idx:
        where = (Ellipsis, idx[-1])
      else:
        out[src] = x
        continue
      out[src] = out[src].at[where].set(x, mode="promise_in_bounds", unique_indices=True)
    return _nest(out)


def _level_plan(params: Params, ratio: float, depth: int | None, input_keys: str,
                output_keys: str, flatten_keys: str) -> _LevelPlan:
  """The static plan of the width-`ratio` (depth-`depth`) level over `params`' shapes."""
  cuts = _width_cuts(params, input_keys, output_keys, flatten_keys)
  stages = _flat(leaf_stages(params)) if depth is not None else None
  last = max(stages.values()) if stages else None
  sources = {}
  for keys in cuts:
    if depth is None or depth == last:
      sources[keys] = keys
    elif stages[keys] <= depth and keys[0] != "head":
      m = _EXIT.match(keys[0])
      if m and int(m.group(1)) == depth:  # the truncated model's head is this level's exit
        sources[("head",) + keys[1:]] = keys
      else:
        sources[keys] = keys
  return _LevelPlan(sources, cuts, float(ratio))


def _level_spec(spec, ratio: float, depth: int | None):
  """The spec of a level's sliced model: every channel group of width C keeps
  `keep_count(C, ratio)`; with `depth`, only the first `depth` stages (ResNetSpec)."""
  if depth is not None and depth < len(spec.stage_widths):
    spec = dataclasses.replace(spec, stage_widths=spec.stage_widths[:depth],
                               stage_strides=spec.stage_strides[:depth],
                               inner_widths=spec.inner_widths[:depth])
  return _resize_spec(spec, {g.name: static_keep_count(g.width, ratio)
                             for g in structured.groups(spec)})


def grouped_level_specs(grouped: GroupedExecution, widths: Sequence[float],
                        depths: Sequence[int] | None = None) -> tuple:
  """The sliced spec each level's program trains (`GroupedExecution`), in level order."""
  return tuple(_level_spec(grouped.spec, float(w), None if depths is None else int(d))
               for w, d in zip(widths, depths if depths is not None else [None] * len(widths)))


def width_method(apply_fn: Callable, client_optimizer: optax.GradientTransformation,
                 schedule: LocalSchedule, *, capacities: Sequence[float],
                 widths: Sequence[float] | None = None, depths: Sequence[int] | None = None,
                 rolling: bool = False, eval_window: str = "extraction", scaler: bool = True,
                 server_learning_rate: float = 1.0,
                 loss_fn_for_depth: Callable | None = None, exit_index_for_depth: Callable | None = None,
                 loss_fn: Callable = softmax_cross_entropy, train_transform: Callable | None = None,
                 input_keys: str = INPUT_KEYS, output_keys: str = OUTPUT_KEYS,
                 flatten_keys: str = NO_KEYS, spec=None,
                 grouped: GroupedExecution | None = None,
                 exit_stages: Sequence[int] | None = None,
                 aggregator=None, level_clients: Sequence[int] | None = None) -> HeteroMethod:
  """The shared HeteroFL / FedRolex / ScaleFL algorithm (see the public factories).

  `eval_window` (rolling only; `fedrolex`'s docstring): the window offset a level is
  evaluated on, 'extraction' = round_idx (the window the server would extract now),
  'last_round' = round_idx - 1 (the window the last round trained), 'prefix' = 0.
  `spec`: None (widths from the param names and the `*_keys` regexes) or a text spec
  (LSTMSpec / TransformerSpec: widths are its structured groups, module docstring).
  `grouped`: None (every client runs the full-size model under its level's masks) or a
  `GroupedExecution` (each level trains its sliced model; CNN/MLP specs, static BN).
  `exit_stages` (ScaleFL with `grouped`): the stages the early-exit model exits after.
  `aggregator`, `level_clients`: `heterofl`'s (the aggregator in the path, `_hetero.in_path`).
  """
  caps = _hetero.check_capacities(capacities)
  if eval_window not in EVAL_WINDOWS:
    raise ValueError(f"eval_window must be one of {EVAL_WINDOWS}, got {eval_window!r}")
  text = spec is not None
  if text:
    _check_text_spec(spec)
    if (input_keys, output_keys, flatten_keys) != (INPUT_KEYS, OUTPUT_KEYS, NO_KEYS):
      raise ValueError("input_keys / output_keys / flatten_keys select CNN layers by name; with "
                       "a text spec the widths are its groups (text_width_masks): pass none")
    if depths is not None:
      raise ValueError("depths (ScaleFL) need a ResNet with early exits, not a text spec")
    text_scaled = _text_scaled_leaves(spec)
  if widths is None:
    widths = text_widths(spec, caps) if text else sqrt_widths(caps)
  widths = tuple(float(w) for w in widths)
  if len(widths) != len(caps) or not all(0 < w <= 1 for w in widths):
    raise ValueError(f"widths must give one ratio in (0, 1] per capacity level {caps}, got {widths}")
  if depths is not None and len(depths) != len(caps):
    raise ValueError(f"depths must give one depth per capacity level {caps}, got {depths}")
  if not server_learning_rate > 0:
    raise ValueError(f"server_learning_rate must be > 0, got {server_learning_rate}")
  client_optimizer = _hetero.check_optimizer(client_optimizer)
  if grouped is not None:
    if not isinstance(grouped, GroupedExecution):
      raise TypeError(f"grouped must be a GroupedExecution or None, got {grouped!r}")
    if text:
      raise ValueError("grouped execution slices the channel groups of an MLP/ConvNet/ResNet "
                       "spec; text models run masked (pass grouped=None)")
    if depths is not None and exit_stages is None:
      raise ValueError("grouped execution of depth levels (ScaleFL) needs exit_stages")
  if level_clients is not None and len(level_clients) != len(caps):
    raise ValueError(f"level_clients must give one count per capacity level {caps}, got "
                     f"{tuple(level_clients)}")
  widths_L = jnp.asarray(widths, jnp.float32)
  depths_L = None if depths is None else jnp.asarray(depths, jnp.int32)

  def masks_for(params, ratio, offset):
    if text:
      return text_width_masks(spec, ratio, offset)
    return width_masks(params, ratio, offset, input_keys=input_keys, output_keys=output_keys,
                       flatten_keys=flatten_keys)

  def scale(params, factor):
    if text:
      return _scale_text(params, factor, text_scaled)
    return _scale_outputs(params, factor, output_keys)

  def ownership(params, level, offset):
    masks = masks_for(params, widths_L[level], offset)
    if depths_L is not None:
      masks = jax.tree.map(jnp.logical_and, masks, depth_masks(params, depths_L[level]))
    return masks

  if grouped is not None:
    level_depths = [None] * len(caps) if depths is None else [int(d) for d in depths]
    level_specs = grouped_level_specs(grouped, widths, depths)
    num_outputs = None if depths is None else len(exit_stages) + 1

    def level_apply(level):
      if depths is None:
        return grouped.apply_for(level_specs[level])
      return grouped.apply_for(level_specs[level],
                               tuple(s for s in exit_stages if s < level_depths[level]))

    level_applies = tuple(level_apply(l) for l in range(len(caps)))

    def level_plan(params, level):
      return _level_plan(params, widths[level], level_depths[level], input_keys, output_keys,
                         flatten_keys)

    def sliced_apply(level):
      # The masked strategy's forward pass (`_submodel_apply`) on the sliced params: the
      # scaler's 1/r, and ScaleFL's exits beyond the level's depth as zero logits (the
      # distillation loss gives them weight 0).
      apply_fn_l = level_applies[level]
      factor = np.float32(1.0) / np.float32(widths[level])

      def apply(params, batch_stats, x, *, train, example_mask=None):
        p = scale(params, factor) if scaler else params
        logits, stats = apply_fn_l(p, batch_stats, x, train=train, example_mask=example_mask)
        if num_outputs is not None and logits.shape[1] < num_outputs:
          logits = jnp.pad(logits, ((0, 0), (0, num_outputs - logits.shape[1]), (0, 0)))
        return logits, stats
      return apply

    level_trains = tuple(
        make_local_train(sliced_apply(l), client_optimizer, schedule,
                         loss_fn=loss_fn if depths is None else loss_fn_for_depth(level_depths[l]),
                         train_transform=train_transform)
        for l in range(len(caps)))

    def check_grouped(params, batch_stats):
      if batch_stats:
        raise ValueError("grouped execution needs static BatchNorm (norm='batch_static') or no "
                         "BatchNorm: running statistics of a sliced model have no full-size "
                         "counterpart to average")
      x = jax.ShapeDtypeStruct((1,) + tuple(grouped.spec.input_shape), jnp.float32)
      for level in range(len(caps)):
        sliced = jax.eval_shape(lambda p: level_plan(p, level).gather(p, 0), params)
        try:
          jax.eval_shape(lambda p, x: level_applies[level](p, {}, x, train=True), sliced, x)
        except ValueError as err:
          raise ValueError(f"grouped execution: level {caps[level]}'s sliced params do not fit "
                           f"its spec {level_specs[level]}: {err}") from None

  def init(params: Params, key: jax.Array, batch_stats=None) -> HeteroState:
    del key
    if grouped is not None:
      check_grouped(params, batch_stats)
    if text:
      _text_check_params(spec, params)
    elif any(path_str(p).endswith("/embedding") for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]):
      # The key regexes would slice a [V, d] embedding table as a kernel's channels.
      raise ValueError("these params have an embedding table (a text model): pass spec= its "
                       "LSTMSpec / TransformerSpec, so the widths are its units and heads")
    return _hetero.init_state(params, batch_stats, lambda p: ())

  def grouped_client_update(state: HeteroState, data, info: ClientInfo, key: jax.Array
                            ) -> ClientOutput:
    level = _hetero.level_index(caps, info.capacity)
    offset = state.round_idx if rolling else 0
    present = ownership(state.params, level, offset)

    def branch(l):
      # `offset` is closed over: HeteroFL's 0 stays a Python int (constant indices).
      def run(params, data, key):
        plan = level_plan(params, l)
        sliced = plan.gather(params, offset)
        local, metrics = level_trains[l](sliced, state.batch_stats, data, key)
        return plan.scatter(tree_lib.sub(sliced, local.params), params, offset), metrics
      return run

    operands = (state.params, data, key)
    if len(caps) == 1:
      delta, metrics = branch(0)(*operands)
    else:  # one program per level; the client runs its own (`GroupedExecution`)
      delta, metrics = jax.lax.switch(level, [branch(l) for l in range(len(caps))], *operands)
    return _hetero.delta_output(delta, state.batch_stats, present, metrics)

  def client_update(state: HeteroState, data, info: ClientInfo, key: jax.Array) -> ClientOutput:
    level = _hetero.level_index(caps, info.capacity)
    offset = state.round_idx if rolling else 0
    masks = ownership(state.params, level, offset)
    sub_apply = _submodel_apply(apply_fn, masks, widths_L[level], scaler, output_keys, scale)
    client_loss = loss_fn if depths_L is None else loss_fn_for_depth(depths_L[level])
    local_train = make_local_train(sub_apply, client_optimizer, schedule, loss_fn=client_loss,
                                   train_transform=train_transform)
    local, metrics = local_train(state.params, state.batch_stats, data, key)
    return _hetero.client_output(state, local.params, local.batch_stats, masks, metrics)

  def server_update(state: HeteroState, outputs: ClientOutput, key: jax.Array):
    del key
    return _hetero.server_step(state, outputs, server_learning_rate, lambda p: ())

  def _eval_offset(round_idx):
    if eval_window == "extraction":  # the window `split_model` hands out after `step`
      return round_idx
    if eval_window == "last_round":
      return jnp.maximum(round_idx - 1, 0)
    return jnp.zeros((), jnp.int32)

  def submodel(state: HeteroState, capacity):
    """Level capacities use their configured (width, depth); others scale the nearest
    level's width (r ~ sqrt(capacity); a transformer's r ~ capacity, `text_widths`)."""
    cap = jnp.asarray(capacity, jnp.float32)
    level = _hetero.level_index(caps, cap)
    # Off-level sizes (the 1 ... 1/256 sweep) scale the nearest level's width: r ~ sqrt(size).
    size_ratio = cap / jnp.asarray(caps, jnp.float32)[level]
    if not isinstance(spec, models.TransformerSpec):
      size_ratio = jnp.sqrt(size_ratio)
    ratio = jnp.minimum(widths_L[level] * size_ratio, 1.0)
    offset = _eval_offset(state.round_idx) if rolling else 0
    masks = masks_for(state.params, ratio, offset)
    if depths_L is not None:
      masks = jax.tree.map(jnp.logical_and, masks, depth_masks(state.params, depths_L[level]))
    params = masks_lib.apply(state.params, masks)
    if scaler:  # as in training (`_submodel_apply`): the same forward pass
      params = scale(params, 1.0 / ratio)
    if depths_L is None:
      return params, jnp.zeros((), jnp.int32)
    return params, exit_index_for_depth(depths_L[level])

  def expected_share(state: HeteroState):
    """The public share of the clients whose level holds each coordinate this round
    (FedRolex: the rolled windows of `state.round_idx`)."""
    offset = state.round_idx if rolling else 0
    return _hetero.holder_share(state.params, [ownership(state.params, l, offset)
                                               for l in range(len(caps))], level_clients)

  alg = FedAlgorithm(init, client_update if grouped is None else grouped_client_update,
                     server_update)
  return HeteroMethod(_hetero.in_path(alg, aggregator,
                                      None if level_clients is None else expected_share),
                      submodel)
