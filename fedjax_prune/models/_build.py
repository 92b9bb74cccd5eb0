"""NNX models built from specs, exposed through a pure functional boundary.

`build` / `make_apply` return `apply_fn(params, batch_stats, x, *, train,
example_mask=None) -> (logits, new_batch_stats)`. Inside, the NNX module is
re-created from the plain-dict state with `nnx.merge` on every call, run, and
its (possibly updated) BatchStats are read back with `nnx.state`. The module
only ever lives inside one trace, so its in-place BatchStat updates never
cross trace levels, and apply_fn composes with jit, vmap, grad, scan and map.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_prune.models import _inception
from fedjax_prune.models import _layers
from fedjax_prune.models import _specs
from fedjax_prune.models import _text
from fedjax_prune.types import ApplyFn, BatchStats, Params, PRNGKey


# ----------------------------------------------------------------------------
# Modules.


def _bn_or_none(features: int, use_bn: bool, mode: str) -> Optional[_layers.BatchNorm]:
  return _layers.BatchNorm(features, mode) if use_bn else None


def _maybe_bn(bn: Optional[_layers.BatchNorm], x: jax.Array, train: bool,
              example_mask: Optional[jax.Array]) -> jax.Array:
  return x if bn is None else bn(x, train=train, example_mask=example_mask)


def _gate_channels(h: jax.Array, gate: Optional[jax.Array]) -> jax.Array:
  """Scales the channels (last axis) of h by a unit gate: [C] or per-example [B, C]."""
  if gate is None:
    return h
  gate = jnp.asarray(gate, h.dtype)
  lead = (gate.shape[0],) if gate.ndim == 2 else (1,)
  return h * gate.reshape(lead + (1,) * (h.ndim - 2) + (gate.shape[-1],))


def _gate_examples(h: jax.Array, gate: Optional[jax.Array]) -> jax.Array:
  """Scales a residual branch by a layer gate: [] or per-example [B]."""
  if gate is None:
    return h
  gate = jnp.asarray(gate, h.dtype)
  return h * gate.reshape(gate.shape + (1,) * (h.ndim - gate.ndim))


class _MLP(nnx.Module):
  """dense_0 .. dense_{n-1}, ReLU between; dense_{n-1} gives the logits."""

  def __init__(self, spec: _specs.MLPSpec, conv_impl: str, kernel_init_fn, *, rngs: nnx.Rngs):
    del conv_impl  # no convs
    self.num_dense = len(spec.hidden) + 1
    in_features = math.prod(spec.input_shape)
    for i, width in enumerate(spec.hidden + (spec.num_classes,)):
      setattr(self, f'dense_{i}', _layers.Dense(in_features, width, kernel_init_fn, rngs=rngs))
      in_features = width

  def __call__(self, x: jax.Array, *, train: bool, example_mask: Optional[jax.Array],
               dense_lowrank: Optional[dict] = None):
    del train, example_mask  # no BatchNorm
    h = x.reshape(x.shape[0], -1)
    return _dense_stack(self, self.num_dense, h, dense_lowrank)


def _dense_stack(module, num_dense: int, h: jax.Array, dense_lowrank: Optional[dict]):
  """dense_0 .. dense_{n-1} with ReLU between. Without `dense_lowrank`: the logits. With it
  ({name: (left, right, probe)}, see `_layers.Dense`): (logits, {name: the layer's input [B, in]})."""
  inputs = {}
  for j in range(num_dense):
    name = f'dense_{j}'
    lowrank = None if dense_lowrank is None else dense_lowrank.get(name)
    if lowrank is not None:
      inputs[name] = h
    h = getattr(module, name)(h, lowrank)
    if j < num_dense - 1:
      h = jax.nn.relu(h)
  return h if dense_lowrank is None else (h, inputs)


class _ConvNet(nnx.Module):
  """conv_i (+ bn_i) for each conv, then dense_j for hidden widths and logits."""

  def __init__(self, spec: _specs.ConvNetSpec, conv_impl: str, kernel_init_fn, *,
               rngs: nnx.Rngs):
    self.pools = tuple(conv.pool for conv in spec.convs)
    self.head = spec.head
    self.num_dense = len(spec.hidden) + 1
    in_features = spec.input_shape[-1]
    for i, conv in enumerate(spec.convs):
      setattr(self, f'conv_{i}', _layers.Conv(in_features, conv.features, conv.kernel,
                                               conv.stride, conv.padding, conv.bias, conv_impl,
                                               kernel_init_fn, rngs=rngs))
      setattr(self, f'bn_{i}', _bn_or_none(conv.features, conv.norm, spec.norm))
      in_features = conv.features
    in_features = spec.head_features()
    for j, width in enumerate(spec.hidden + (spec.num_classes,)):
      setattr(self, f'dense_{j}', _layers.Dense(in_features, width, kernel_init_fn, rngs=rngs))
      in_features = width

  def __call__(self, x: jax.Array, *, train: bool, example_mask: Optional[jax.Array],
               gates: Optional[dict] = None, dense_lowrank: Optional[dict] = None):
    gates = {} if gates is None else gates
    h = x
    for i, pool in enumerate(self.pools):
      h = getattr(self, f'conv_{i}')(h)
      h = _maybe_bn(getattr(self, f'bn_{i}'), h, train, example_mask)
      h = _gate_channels(jax.nn.relu(h), gates.get(f'conv_{i}'))
      if pool is not None:
        h = _layers.max_pool(h, pool)
    h = _layers.global_avg_pool(h) if self.head == 'gap' else h.reshape(h.shape[0], -1)
    return _dense_stack(self, self.num_dense, h, dense_lowrank)


class _Stem(nnx.Module):
  """conv -> [bn] -> ReLU -> [max-pool]."""

  def __init__(self, spec: _specs.ResNetSpec, conv_impl: str, kernel_init_fn, *,
               rngs: nnx.Rngs):
    k, s = spec.stem_kernel, spec.stem_stride
    self.conv = _layers.Conv(spec.input_shape[-1], spec.stem_width, (k, k), (s, s), spec.padding,
                             spec.conv_bias, conv_impl, kernel_init_fn, rngs=rngs)
    self.bn = _bn_or_none(spec.stem_width, spec.norm != 'none', spec.norm)
    self.pool = spec.stem_pool

  def __call__(self, x, *, train, example_mask):
    h = jax.nn.relu(_maybe_bn(self.bn, self.conv(x), train, example_mask))
    return h if self.pool is None else _layers.max_pool(h, self.pool)


class _BasicBlock(nnx.Module):
  """conv1 -> bn1 -> ReLU -> conv2 -> bn2, + (shortcut_conv -> shortcut_bn | identity), ReLU."""

  def __init__(self, spec: _specs.ResNetSpec, in_width: int, inner_width: int, out_width: int,
               stride: int, conv_impl: str, kernel_init_fn, *, rngs: nnx.Rngs):
    use_bn = spec.norm != 'none'
    conv = lambda ci, co, k, s: _layers.Conv(ci, co, (k, k), (s, s), spec.padding,
                                             spec.conv_bias, conv_impl, kernel_init_fn, rngs=rngs)
    self.conv1 = conv(in_width, inner_width, 3, stride)
    self.bn1 = _bn_or_none(inner_width, use_bn, spec.norm)
    self.conv2 = conv(inner_width, out_width, 3, 1)
    self.bn2 = _bn_or_none(out_width, use_bn, spec.norm)
    if _specs.block_has_shortcut_conv(in_width, out_width, stride):
      self.shortcut_conv = conv(in_width, out_width, 1, stride)
      self.shortcut_bn = _bn_or_none(out_width, use_bn, spec.norm)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x, *, train, example_mask, gates=None):
    gates = {} if gates is None else gates
    h = jax.nn.relu(_maybe_bn(self.bn1, self.conv1(x), train, example_mask))
    h = _gate_channels(h, gates.get('unit'))
    h = _maybe_bn(self.bn2, self.conv2(h), train, example_mask)
    h = _gate_examples(h, gates.get('layer'))
    shortcut = x
    if self.shortcut_conv is not None:
      shortcut = _maybe_bn(self.shortcut_bn, self.shortcut_conv(x), train, example_mask)
    return jax.nn.relu(h + shortcut)


class _ResNet(nnx.Module):
  """stem, stage{s}_block{b} (s from 1), head."""

  def __init__(self, spec: _specs.ResNetSpec, conv_impl: str, kernel_init_fn, *,
               rngs: nnx.Rngs):
    self.stem = _Stem(spec, conv_impl, kernel_init_fn, rngs=rngs)
    self.block_names = tuple(row[0] for row in spec.blocks())
    for name, in_width, inner_width, out_width, stride in spec.blocks():
      setattr(self, name, _BasicBlock(spec, in_width, inner_width, out_width, stride, conv_impl,
                                      kernel_init_fn, rngs=rngs))
    self.head_mode = spec.head
    if spec.head == 'gap':
      head_features = spec.stage_widths[-1]
    else:
      h, w = _resnet_final_hw(spec)
      head_features = h * w * spec.stage_widths[-1]
    self.head = _layers.Dense(head_features, spec.num_classes, kernel_init_fn, rngs=rngs)

  def __call__(self, x, *, train, example_mask, gates=None):
    gates = {} if gates is None else gates
    h = self.stem(x, train=train, example_mask=example_mask)
    for name in self.block_names:
      h = getattr(self, name)(h, train=train, example_mask=example_mask, gates=gates.get(name))
    h = _layers.global_avg_pool(h) if self.head_mode == 'gap' else h.reshape(h.shape[0], -1)
    return self.head(h)


def _resnet_final_hw(spec: _specs.ResNetSpec) -> tuple[int, int]:
  k, s = spec.stem_kernel, spec.stem_stride
  hw = _specs.conv_output_hw(spec.input_shape[:2], (k, k), (s, s), spec.padding)
  hw = _specs.pool_output_hw(hw, spec.stem_pool)
  for stride in spec.stage_strides:
    hw = _specs.conv_output_hw(hw, (3, 3), (stride, stride), spec.padding)
  return hw


_MODULES = {_specs.MLPSpec: _MLP, _specs.ConvNetSpec: _ConvNet, _specs.ResNetSpec: _ResNet}
_MODULES[_inception.InceptionSpec] = _inception.Inception  # models/_inception.py


def _module(spec, conv_impl: str, kernel_init_fn, key: PRNGKey) -> nnx.Module:
  module_cls = _MODULES.get(type(spec))
  if module_cls is None:
    raise ValueError(f'spec must be an MLPSpec, ConvNetSpec, ResNetSpec or InceptionSpec, got {type(spec)}')
  conv_impl = _layers.resolve_conv_impl(conv_impl)
  if kernel_init_fn is None:
    kernel_init_fn = _layers.default_kernel_init()
  return module_cls(spec, conv_impl, kernel_init_fn, rngs=nnx.Rngs(params=key))


def _abstract_split(spec, conv_impl: str):
  """(graphdef, abstract Param state, abstract BatchStat state), no arrays allocated."""
  abstract = nnx.eval_shape(lambda: _module(spec, conv_impl, None, jax.random.key(0)))
  return nnx.split(abstract, nnx.Param, nnx.BatchStat)


# ----------------------------------------------------------------------------
# Public API.


def param_shapes(spec) -> tuple[Params, BatchStats]:
  """Abstract `(params, batch_stats)`: nested dicts of `jax.ShapeDtypeStruct`.

  Costs no FLOPs and no memory (use it for full-size models in tests and for
  accounting). Memoised per spec (specs are frozen; tracing ResNet-18 for its shapes
  takes ~0.1 s and `accounting` asks many times); every call returns fresh dicts.
  """
  try:
    shapes = _cached_param_shapes(spec)
  except TypeError:  # an unhashable spec (e.g. a list inside): trace it each time
    shapes = _param_shapes(spec)
  return jax.tree.map(lambda leaf: leaf, shapes)  # new containers: callers may edit them


def _param_shapes(spec) -> tuple[Params, BatchStats]:
  if isinstance(spec, _text.TEXT_SPECS):  # text models: models/_text.py
    return _text.param_shapes(spec)
  _, params_state, stats_state = _abstract_split(spec, 'lax')
  return nnx.to_pure_dict(params_state), nnx.to_pure_dict(stats_state)


_cached_param_shapes = functools.lru_cache(maxsize=256)(_param_shapes)


def _default_leaf(keys: tuple[str, ...]) -> str:
  """Which default initialiser a leaf gets: 'kernel', 'zeros' or 'ones'."""
  if keys[-1] == 'kernel':
    return 'kernel'
  return 'ones' if keys[-1] in ('scale', 'var') else 'zeros'


def _default_init(spec, key: PRNGKey) -> tuple[Params, BatchStats]:
  """PyTorch-default kernels from ONE flat uniform draw, sliced per kernel.

  Drawing every kernel from one 1-D `jax.random.uniform` compiles one small
  program per model size; per-kernel N-d draws compile one threefry program
  per kernel shape, each far slower to compile (seconds for a ResNet), and
  paper 1 re-initialises a new architecture up to ~100 times per run.
  Concrete keys slice on the host (no further compiles); traced keys (under
  jit/vmap) slice with jnp.
  """
  params_abs, stats_abs = param_shapes(spec)
  flat_params = jax.tree_util.tree_flatten_with_path(params_abs)
  flat_stats = jax.tree_util.tree_flatten_with_path(stats_abs)
  entries = [(tuple(str(getattr(k, 'key', k)) for k in path), tuple(leaf.shape))
             for path, leaf in flat_params[0] + flat_stats[0]]
  total = sum(math.prod(shape) for keys, shape in entries if _default_leaf(keys) == 'kernel')
  uniform = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
  xp = jnp if isinstance(uniform, jax.core.Tracer) else np
  if xp is np:
    uniform = np.asarray(uniform)
  leaves, offset = [], 0
  for keys, shape in entries:
    kind = _default_leaf(keys)
    if kind == 'kernel':
      size = math.prod(shape)
      bound = np.float32(1.0 / math.sqrt(math.prod(shape[:-1])))
      leaf = uniform[offset:offset + size].reshape(shape) * bound
      offset += size
    else:
      leaf = (xp.ones if kind == 'ones' else xp.zeros)(shape, np.float32)
    leaves.append(leaf if xp is jnp else jnp.asarray(leaf))
  num_params = len(flat_params[0])
  params = jax.tree.unflatten(flat_params[1], leaves[:num_params])
  batch_stats = jax.tree.unflatten(flat_stats[1], leaves[num_params:])
  return params, batch_stats


def init_params(spec, key: PRNGKey, *,
                kernel_init_fn: Optional[_layers.KernelInit] = None) -> tuple[Params, BatchStats]:
  """Initial `(params, batch_stats)` of the model of `spec`.

  Default initialisation (PyTorch conventions for weights): every conv and
  dense kernel U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = prod of all
  kernel dims but the last (torch's `kaiming_uniform_(a=sqrt(5))`); biases 0;
  BN scale 1, bias 0, running mean 0, running var 1. All kernels come from one
  flat uniform draw (cheap to compile; see `_default_init`).

  Args:
    spec: an `MLPSpec`, `ConvNetSpec` or `ResNetSpec`.
    key: PRNG key (`jax.random.key`); may be traced (vmap over keys gives
      per-client initialisations).
    kernel_init_fn: optional `jax.nn.initializers` callable used instead for
      every kernel, through the NNX modules, one key per layer (slower to
      compile: one program per kernel shape).

  Returns:
    (params, batch_stats): plain nested dicts of float32 arrays; batch_stats is
    `{}` unless `spec.norm == 'batch_running'`.
  """
  if isinstance(spec, _text.TEXT_SPECS):  # text models: models/_text.py
    if kernel_init_fn is not None:
      raise ValueError('kernel_init_fn is not supported for text models (LSTMSpec, TransformerSpec)')
    return _text.init_params(spec, key)
  if kernel_init_fn is None:
    if type(spec) not in _MODULES:
      raise ValueError(f'spec must be an MLPSpec, ConvNetSpec, ResNetSpec or InceptionSpec, got {type(spec)}')
    return _default_init(spec, key)
  model = _module(spec, 'lax', kernel_init_fn, key)
  _, params_state, stats_state = nnx.split(model, nnx.Param, nnx.BatchStat)
  return nnx.to_pure_dict(params_state), nnx.to_pure_dict(stats_state)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def _to_state(abstract_state: nnx.State, pure: Any, what: str) -> nnx.State:
  """Rebuild an nnx.State from a plain nested dict, checking names and shapes."""
  expected = nnx.to_pure_dict(abstract_state)
  if jax.tree.structure(pure) != jax.tree.structure(expected):
    got = sorted(_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0])
    want = sorted(_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0])
    raise ValueError(f'{what} do not match the spec: missing {sorted(set(want) - set(got))}, '
                     f'unexpected {sorted(set(got) - set(want))}')
  leaves = []
  for (path, want), leaf in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                                jax.tree.leaves(pure)):
    if tuple(jnp.shape(leaf)) != tuple(want.shape):
      raise ValueError(f'{what} {_path_str(path)} has shape {jnp.shape(leaf)}, '
                       f'the spec says {want.shape}')
    leaves.append(leaf)
  return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)


def mixed_precision(compute_dtype: Any) -> tuple[Any, Callable]:
  """(input dtype, cast) of a model computing in `compute_dtype` (see `make_apply`):
  `cast(tree)` casts a pytree's floating leaves to it; None = float32, cast = identity."""
  if compute_dtype is None:
    return jnp.float32, lambda tree: tree
  dtype = jnp.dtype(compute_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'compute_dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype}')
  return dtype, lambda tree: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def make_apply(spec, *, conv_impl: str = 'auto', compute_dtype: Any = None) -> ApplyFn:
  """The pure apply function of the model of `spec` (no parameters created).

  Args:
    spec: an `MLPSpec`, `ConvNetSpec` or `ResNetSpec`.
    conv_impl: 'lax' (`lax.conv_general_dilated`), 'im2col' (shifted slices
      + one matmul; batched GEMMs under vmap over clients), 'tapgrad' (lax
      forward, gradients as canonical forward convs; fast in XLA:CPU loops) or
      'auto' (default: 'tapgrad' on CPU, 'lax' elsewhere; `models.resolve_conv_impl`).
      All give the same values up to float rounding.
    compute_dtype: None (default: float32 throughout) or a floating dtype such as
      `jnp.bfloat16` for mixed precision: the input, the floating parameters, gates
      and `dense_lowrank` factors are cast to it inside apply, so convolutions and
      matmuls run in it (bf16 GEMMs on GPU/TPU), while parameters, their gradients
      (the cast's transpose returns float32), BatchNorm statistics and
      normalisation, the logits and the `dense_lowrank` inputs stay float32.

  Returns:
    `apply_fn(params, batch_stats, x, *, train, example_mask=None) ->
    (logits, new_batch_stats)` where
      * x: [B, *input_shape] (or any shape with B * prod(input_shape)
        elements and leading B), any dtype, cast to float32 (not rescaled);
      * train: Python bool. Train mode normalises with (masked) batch
        statistics and, for 'batch_running', returns updated running
        statistics; eval mode uses the running statistics ('batch_running') or
        the batch statistics ('batch_static') and returns batch_stats unchanged;
      * example_mask: None or [B] bool; BatchNorm batch statistics use only the
        True examples (no effect without BN);
      * logits: [B, num_classes] float32;
      * new_batch_stats: same structure as batch_stats;
      * gates: optional multiplicative structure gates (variational/Bernoulli
        pruning, `fedjax_prune.pruning.cavp`), a dict with any subset of
        ConvNetSpec: {'conv_{i}': [co] or [B, co]} scaling conv i's output
        channels after its ReLU; ResNetSpec: {'stage{s}_block{b}': {'unit':
        [m] or [B, m], 'layer': [] or [B]}} scaling the block's inner channels
        (after ReLU(BN1(conv1))) and its whole residual branch (after BN2,
        before the add). Missing entries are ungated; other specs reject gates.
        Default None: exactly the ungated model;
      * dense_lowrank: optional {'dense_{j}': (left [R, in], right [R, out],
        probe [B, out])} (MLPSpec and ConvNetSpec): layer j computes with the
        kernel `kernel + left^T right` without forming it, plus `probe` on its
        output, and apply_fn then returns a third value, {'dense_{j}': the
        layer's input [B, in]}. With zero probes, the gradients with respect to
        the probes and those inputs give each layer's kernel gradient as the
        factor pair input^T probe_grad: local SGD can then keep a client's kernel
        as the server kernel plus factors (`performance.LowRankDense`).
    Pure: compose freely with jit, vmap (over params, batch_stats and x
    together), grad (use `has_aux`), lax.scan and lax.map.
    Text models (LSTMSpec, TransformerSpec): `_text.make_apply` (token ids in,
    next-token logits out; conv_impl unused).
  """
  if isinstance(spec, _text.TEXT_SPECS):
    return _text.make_apply(spec, compute_dtype=compute_dtype)
  graphdef, abstract_params, abstract_stats = _abstract_split(spec, _layers.resolve_conv_impl(conv_impl))
  input_shape = tuple(spec.input_shape)
  input_dtype, to_compute = mixed_precision(compute_dtype)

  def apply_fn(params: Params, batch_stats: BatchStats, x: jax.Array, *, train: bool,
               example_mask: Optional[jax.Array] = None, gates: Optional[dict] = None,
               dense_lowrank: Optional[dict] = None) -> tuple[jax.Array, BatchStats]:
    params, gates, dense_lowrank = to_compute((params, gates, dense_lowrank))
    params_state = _to_state(abstract_params, params, 'params')
    stats_state = _to_state(abstract_stats, batch_stats, 'batch_stats')
    model = nnx.merge(graphdef, params_state, stats_state)
    x = jnp.asarray(x).astype(input_dtype)
    x = x.reshape((x.shape[0],) + input_shape)
    if example_mask is not None and jnp.shape(example_mask) != (x.shape[0],):
      raise ValueError(f'example_mask must have shape ({x.shape[0]},), got '
                       f'{jnp.shape(example_mask)}')
    if dense_lowrank is not None:
      if not isinstance(model, (_MLP, _ConvNet)):
        raise ValueError(f'dense_lowrank is supported for MLPSpec and ConvNetSpec models, not '
                         f'{type(spec).__name__}')
      unknown = sorted(set(dense_lowrank) - {f'dense_{j}' for j in range(model.num_dense)})
      if unknown:
        raise ValueError(f'dense_lowrank names layers this model does not have: {unknown}')
      extra = {} if gates is None else {'gates': gates}
      if gates is not None and not isinstance(model, _ConvNet):
        raise ValueError('gates are supported for ConvNetSpec and ResNetSpec models, not '
                         f'{type(spec).__name__}')
      logits, inputs = model(x, train=bool(train), example_mask=example_mask,
                             dense_lowrank=dense_lowrank, **extra)
      inputs = jax.tree.map(lambda a: a.astype(jnp.float32), inputs)
      return (logits.astype(jnp.float32), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
              inputs)
    if gates is None:
      logits = model(x, train=bool(train), example_mask=example_mask)
    elif not isinstance(model, (_ConvNet, _ResNet)):
      raise ValueError(f'gates are supported for ConvNetSpec and ResNetSpec models, not '
                       f'{type(spec).__name__}')
    else:
      logits = model(x, train=bool(train), example_mask=example_mask, gates=gates)
    return logits.astype(jnp.float32), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  return apply_fn


def build(spec, key: PRNGKey, *, conv_impl: str = 'auto',
          kernel_init_fn: Optional[_layers.KernelInit] = None, compute_dtype: Any = None
          ) -> tuple[ApplyFn, Params, BatchStats]:
  """Build the model of `spec`: `(apply_fn, params, batch_stats)`.

  See `make_apply` for `apply_fn` (and `compute_dtype`) and `init_params` for the
  initial state (float32 parameters).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from fedjax_prune import models
    >>> spec = models.asp_femnist_cnn(widths=(4, 8))
    >>> apply_fn, params, batch_stats = models.build(spec, jax.random.key(0))
    >>> logits, _ = apply_fn(params, batch_stats, jnp.zeros((2, 28, 28, 1)), train=False)
    >>> logits.shape
    (2, 62)
  """
  params, batch_stats = init_params(spec, key, kernel_init_fn=kernel_init_fn)
  return make_apply(spec, conv_impl=conv_impl, compute_dtype=compute_dtype), params, batch_stats
