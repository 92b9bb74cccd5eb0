"""Accounting: parameters, FLOPs, bytes on the wire and client memory.

Pure host-side functions of a model spec (`fedjax_prune.models`), optional
masks and a few configuration numbers. Nothing here is jitted or traced: masks
must be concrete arrays (numpy or jax), and results are exact Python ints.

Masks follow the library convention: a tree with the structure of the params,
bool leaves broadcastable to the parameter (full shape = unstructured,
`(1, ..., out)` = channel mask, `()` = unpruned when True). A missing subtree
means "not pruned".

FLOPs convention (TensorFlow profiler "float_ops" at batch 1, as used by the
automatic-structured-pruning paper's code, github.com/NguyenThaiVu/prune_fl_project):

  * conv / dense: 2 FLOPs per multiply-accumulate (MAC);
  * BiasAdd: 1 per output element (only for layers with a bias);
  * max-pool: output elements x window size (window * window);
  * global average pool (Mean): input elements;
  * residual add: 1 per output element;
  * softmax: 5 x classes (the models output logits, but the paper's Keras
    models end in a softmax; switch off with `include_softmax=False`);
  * ReLU, flatten: 0;
  * BatchNorm: `bn_flops_per_element` per output element, default **0**:
    TF's profiler registers no FLOPs for FusedBatchNorm, and with 0 the
    paper's ResNet-style CelebA model gives exactly the 5,234,332 FLOPs its
    notebook prints (with a residual add at 1 per element). Pass 2 to count an
    inference-time scale-and-shift.

These reproduce the paper's numbers exactly: FEMNIST CNN [32, 64] 7,529,588 and
[17, 43] 2,860,280; CelebA CNN 4 x 32 152,485,804.

Masked FLOPs. A layer costs MACs = output positions x number of kept kernel
entries whose input channel is alive. An output channel (filter) is alive when
at least one kept kernel entry reads an alive input channel (and, after a
BatchNorm, its scale is kept); a removed filter's bias is a constant that could
be folded into the next layer, so it costs nothing. Aliveness propagates
through pools, flatten (each spatial copy of a channel), global pooling and
residual adds (alive if alive in either branch). Hence: channel masks give the
FLOPs of the smaller dense model with those filters removed (that layer's
output and the next layer's input shrink), and unstructured masks scale a
layer's MACs with its kernel density.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import numpy as np

from fedjax_prune import models
from fedjax_prune.types import Masks, PyTree

ENCODINGS = ('dense', 'bitmap', 'index')


class LayerCost(NamedTuple):
  """One operation of the forward pass at batch 1.

  Attributes:
    name: parameter path of the layer ('conv_0', 'stage1_block0/conv1') or an
      op name ('relu_0', 'pool_0', 'gap', 'stage1_block0/add', 'softmax').
    op: 'conv', 'dense', 'bn', 'relu', 'pool', 'gap', 'flatten', 'add', 'softmax'.
    output_shape: full (unmasked) output shape, without the batch axis.
    params: kept trainable parameters of the layer (kernel + bias, or BN
      scale + bias).
    flops: all FLOPs of the op (MACs x 2 + bias adds, or elementwise work).
    mac_flops: 2 x MACs (0 for non-matmul ops).
    activations: output elements in alive channels (what a backward pass keeps).
  """
  name: str
  op: str
  output_shape: tuple[int, ...]
  params: int
  flops: int
  mac_flops: int
  activations: int


class RoundBytes(NamedTuple):
  """Bytes moved per client per round."""
  upload: int
  download: int


class MemoryEstimate(NamedTuple):
  """Per-client training memory in bytes, by component (see `training_memory`)."""
  params: int
  grads: int
  optimizer: int
  masks: int
  activations: int
  total: int


# ----------------------------------------------------------------------------
# Mask handling.


def _is_spec(value: Any) -> bool:
  return isinstance(value, (models.MLPSpec, models.ConvNetSpec, models.ResNetSpec,
                            models.InceptionSpec) + models.TEXT_SPECS)


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def _lookup(masks: Optional[Masks], keys: Sequence[str]) -> Optional[Any]:
  """The mask leaf at `keys`, or None when the path is absent (= unpruned)."""
  node = masks
  for k in keys:
    if node is None or not hasattr(node, 'get'):
      return None
    node = node.get(k)
  return node


def _raw_mask(masks: Optional[Masks], keys: Sequence[str], shape: tuple[int, ...]
              ) -> Optional[np.ndarray]:
  """The mask leaf as a bool numpy array, checked broadcastable to `shape`; None if absent."""
  leaf = _lookup(masks, keys)
  if leaf is None:
    return None
  try:
    mask = np.asarray(leaf).astype(bool)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(f'mask {"/".join(keys)} is traced; accounting needs concrete masks '
                     '(call it outside jit)') from None
  try:
    np.broadcast_to(mask, shape)
  except ValueError:
    raise ValueError(f'mask {"/".join(keys)} of shape {mask.shape} does not broadcast to the '
                     f'parameter shape {shape}') from None
  return mask


def _full_mask(masks: Optional[Masks], keys: Sequence[str], shape: tuple[int, ...]) -> np.ndarray:
  mask = _raw_mask(masks, keys, shape)
  if mask is None:
    return np.ones(shape, bool)
  return np.broadcast_to(mask, shape)


def _kept(masks: Optional[Masks], keys: Sequence[str], shape: tuple[int, ...]) -> int:
  mask = _raw_mask(masks, keys, shape)
  if mask is None:
    return math.prod(shape)
  return int(np.broadcast_to(mask, shape).sum())


def _check_mask_paths(masks: Optional[Masks], shapes: PyTree) -> None:
  """Every mask leaf must name a parameter (`shapes`: a `_shape_tree`)."""
  if masks is None:
    return
  known = {keys for keys, _ in _leaves_with_keys(shapes)}
  for path, _ in jax.tree_util.tree_flatten_with_path(masks)[0]:
    keys = _path_keys(path)
    if keys not in known:
      raise ValueError(f'mask {"/".join(keys)} names no parameter of the model')


def _shape_tree(params_or_spec: Any, include_batch_stats: bool) -> PyTree:
  """Nested dict of shapes (tuples) from a spec or a pytree of arrays."""
  if _is_spec(params_or_spec):
    params, batch_stats = models.param_shapes(params_or_spec)
    tree = {'params': params, 'batch_stats': batch_stats} if include_batch_stats else params
  else:
    if include_batch_stats:
      raise ValueError('include_batch_stats needs a spec; pass the stats inside the tree instead')
    tree = params_or_spec
  return jax.tree.map(lambda leaf: tuple(np.shape(leaf)), tree,
                      is_leaf=lambda leaf: hasattr(leaf, 'shape'))


def _leaves_with_keys(shape_tree: PyTree) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
  flat = jax.tree_util.tree_flatten_with_path(shape_tree, is_leaf=is_shape)[0]
  return [(_path_keys(p), shape) for p, shape in flat]


# ----------------------------------------------------------------------------
# Parameters.


def param_count(spec: Optional[models.ModelSpec], masks: Optional[Masks] = None,
                params: Optional[PyTree] = None, *, include_batch_stats: bool = False) -> int:
  """Number of trainable parameters, or of kept ones under `masks`.

  BatchNorm scale and bias are trainable and counted; running statistics are
  not (Keras counts them as non-trainable parameters: pass
  `include_batch_stats=True` to add them, e.g. to compare with `model.summary()`).

  Args:
    spec: model spec, or None when `params` is given.
    masks: optional mask tree; each leaf contributes its number of kept entries
      after broadcasting to the parameter.
    params: optional params tree (arrays or ShapeDtypeStructs) whose shapes
      are counted instead of the spec's.
    include_batch_stats: also count BN running statistics (needs `spec`).

  Returns:
    The count, a Python int.
  """
  if params is None and spec is None:
    raise ValueError('param_count needs a spec or params')
  tree = _shape_tree(params if params is not None else spec, False)
  _check_mask_paths(masks, tree)
  total = sum(_kept(masks, keys, shape) for keys, shape in _leaves_with_keys(tree))
  if include_batch_stats:
    if spec is None:
      raise ValueError('include_batch_stats needs a spec')
    _, stats = models.param_shapes(spec)
    total += sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(stats))
  return total


# ----------------------------------------------------------------------------
# FLOPs: a walk over the layers that tracks which channels are alive.


class _Feature(NamedTuple):
  """A feature map (h, w set) or a vector (h = w = None) with its alive channels."""
  hw: Optional[tuple[int, int]]
  alive: np.ndarray


class _Walk:
  """Accumulates LayerCost rows; one instance per accounting call (not shared)."""

  def __init__(self, masks: Optional[Masks], bn_flops_per_element: int):
    self.masks = masks
    self.bn_flops_per_element = bn_flops_per_element
    self.rows: list[LayerCost] = []

  def _row(self, name, op, shape, flops, activations, params=0, mac_flops=0):
    self.rows.append(LayerCost(name, op, tuple(shape), int(params), int(flops), int(mac_flops),
                               int(activations)))

  def conv(self, keys, feat, kernel_hw, stride_hw, padding, out_ch, use_bias) -> _Feature:
    in_ch = feat.alive.shape[0]
    kernel_shape = (*kernel_hw, in_ch, out_ch)
    ho, wo = models.conv_output_hw(feat.hw, kernel_hw, stride_hw, padding)
    kernel_mask = _full_mask(self.masks, keys + ('kernel',), kernel_shape)
    live = kernel_mask & feat.alive[None, None, :, None]
    alive = live.any(axis=(0, 1, 2))
    macs = ho * wo * int(live.sum())
    params = _kept(self.masks, keys + ('kernel',), kernel_shape)
    bias_adds = 0
    if use_bias:
      bias_kept = _full_mask(self.masks, keys + ('bias',), (out_ch,))
      bias_adds = ho * wo * int((alive & bias_kept).sum())
      params += _kept(self.masks, keys + ('bias',), (out_ch,))
    self._row('/'.join(keys), 'conv', (ho, wo, out_ch), 2 * macs + bias_adds,
              ho * wo * int(alive.sum()), params, 2 * macs)
    return _Feature((ho, wo), alive)

  def dense(self, keys, feat, out_features) -> _Feature:
    in_features = feat.alive.shape[0]
    shape = (in_features, out_features)
    live = _full_mask(self.masks, keys + ('kernel',), shape) & feat.alive[:, None]
    alive = live.any(axis=0)
    macs = int(live.sum())
    bias_kept = _full_mask(self.masks, keys + ('bias',), (out_features,))
    bias_adds = int((alive & bias_kept).sum())
    params = (_kept(self.masks, keys + ('kernel',), shape)
              + _kept(self.masks, keys + ('bias',), (out_features,)))
    self._row('/'.join(keys), 'dense', (out_features,), 2 * macs + bias_adds,
              int(alive.sum()), params, 2 * macs)
    return _Feature(None, alive)

  def bn(self, keys, feat) -> _Feature:
    channels = feat.alive.shape[0]
    alive = feat.alive & _full_mask(self.masks, keys + ('scale',), (channels,))
    positions = math.prod(feat.hw)
    params = (_kept(self.masks, keys + ('scale',), (channels,))
              + _kept(self.masks, keys + ('bias',), (channels,)))
    self._row('/'.join(keys), 'bn', (*feat.hw, channels),
              self.bn_flops_per_element * positions * int(alive.sum()),
              positions * int(alive.sum()), params)
    return _Feature(feat.hw, alive)

  def relu(self, name, feat) -> _Feature:
    positions = 1 if feat.hw is None else math.prod(feat.hw)
    shape = (feat.alive.shape[0],) if feat.hw is None else (*feat.hw, feat.alive.shape[0])
    self._row(name, 'relu', shape, 0, positions * int(feat.alive.sum()))
    return feat

  def pool(self, name, feat, window) -> _Feature:
    hw = models.pool_output_hw(feat.hw, window)
    out = math.prod(hw) * int(feat.alive.sum())
    self._row(name, 'pool', (*hw, feat.alive.shape[0]), out * window * window, out)
    return _Feature(hw, feat.alive)

  def gap(self, feat) -> _Feature:
    self._row('gap', 'gap', (feat.alive.shape[0],), math.prod(feat.hw) * int(feat.alive.sum()),
              int(feat.alive.sum()))
    return _Feature(None, feat.alive)

  def flatten(self, feat) -> _Feature:
    alive = np.tile(feat.alive, math.prod(feat.hw))  # NHWC row-major: index (h*W + w)*C + c
    self._row('flatten', 'flatten', (alive.shape[0],), 0, 0)
    return _Feature(None, alive)

  def add(self, name, a: _Feature, b: _Feature) -> _Feature:
    alive = a.alive | b.alive
    out = math.prod(a.hw) * int(alive.sum())
    self._row(name, 'add', (*a.hw, alive.shape[0]), out, out)
    return _Feature(a.hw, alive)

  def softmax(self, classes) -> None:
    self._row('softmax', 'softmax', (classes,), 5 * classes, classes)


def _walk_mlp(walk: _Walk, spec: models.MLPSpec) -> None:
  feat = _Feature(None, np.ones(math.prod(spec.input_shape), bool))
  widths = spec.hidden + (spec.num_classes,)
  for i, width in enumerate(widths):
    feat = walk.dense((f'dense_{i}',), feat, width)
    if i < len(widths) - 1:
      feat = walk.relu(f'relu_dense_{i}', feat)


def _walk_convnet(walk: _Walk, spec: models.ConvNetSpec) -> None:
  feat = _Feature(spec.input_shape[:2], np.ones(spec.input_shape[2], bool))
  for i, conv in enumerate(spec.convs):
    feat = walk.conv((f'conv_{i}',), feat, conv.kernel, conv.stride, conv.padding, conv.features,
                     conv.bias)
    if conv.norm:
      feat = walk.bn((f'bn_{i}',), feat)
    feat = walk.relu(f'relu_{i}', feat)
    if conv.pool is not None:
      feat = walk.pool(f'pool_{i}', feat, conv.pool)
  feat = walk.gap(feat) if spec.head == 'gap' else walk.flatten(feat)
  widths = spec.hidden + (spec.num_classes,)
  for j, width in enumerate(widths):
    feat = walk.dense((f'dense_{j}',), feat, width)
    if j < len(widths) - 1:
      feat = walk.relu(f'relu_dense_{j}', feat)


def _walk_resnet(walk: _Walk, spec: models.ResNetSpec) -> None:
  use_bn = spec.norm != 'none'
  k, s = spec.stem_kernel, spec.stem_stride
  feat = _Feature(spec.input_shape[:2], np.ones(spec.input_shape[2], bool))
  feat = walk.conv(('stem', 'conv'), feat, (k, k), (s, s), spec.padding, spec.stem_width,
                   spec.conv_bias)
  if use_bn:
    feat = walk.bn(('stem', 'bn'), feat)
  feat = walk.relu('stem/relu', feat)
  if spec.stem_pool is not None:
    feat = walk.pool('stem/pool', feat, spec.stem_pool)
  for name, in_width, inner_width, out_width, stride in spec.blocks():
    x = feat
    h = walk.conv((name, 'conv1'), x, (3, 3), (stride, stride), spec.padding, inner_width,
                  spec.conv_bias)
    if use_bn:
      h = walk.bn((name, 'bn1'), h)
    h = walk.relu(f'{name}/relu1', h)
    h = walk.conv((name, 'conv2'), h, (3, 3), (1, 1), spec.padding, out_width, spec.conv_bias)
    if use_bn:
      h = walk.bn((name, 'bn2'), h)
    shortcut = x
    if models.block_has_shortcut_conv(in_width, out_width, stride):
      shortcut = walk.conv((name, 'shortcut_conv'), x, (1, 1), (stride, stride), spec.padding,
                           out_width, spec.conv_bias)
      if use_bn:
        shortcut = walk.bn((name, 'shortcut_bn'), shortcut)
    feat = walk.relu(f'{name}/relu2', walk.add(f'{name}/add', h, shortcut))
  feat = walk.gap(feat) if spec.head == 'gap' else walk.flatten(feat)
  walk.dense(('head',), feat, spec.num_classes)


def _walk_inception(walk: _Walk, spec: models.InceptionSpec) -> None:
  """Stem, naive inception modules (branch concat: 0 FLOPs), reduction convs, GAP, denses."""
  feat = _Feature(spec.input_shape[:2], np.ones(spec.input_shape[2], bool))
  feat = walk.relu('stem/relu', walk.conv(('stem',), feat, (3, 3), (2, 2), 'VALID',
                                          spec.stem_width, True))
  for m, widths in enumerate(spec.modules):
    branches = [walk.relu(f'inception{m}/{name}/relu',
                          walk.conv((f'inception{m}', name), feat, (k, k), (1, 1), 'SAME', width,
                                    True))
                for name, k, width in zip(('conv1x1', 'conv3x3', 'conv5x5'), (1, 3, 5), widths)]
    feat = _Feature(feat.hw, np.concatenate([b.alive for b in branches]))
  for i, width in enumerate(spec.reduce_widths):
    feat = walk.relu(f'relu_{i}', walk.conv((f'conv_{i}',), feat, (3, 3), (2, 2), 'VALID', width,
                                            True))
  feat = walk.gap(feat)
  widths = spec.hidden + (spec.num_classes,)
  for j, width in enumerate(widths):
    feat = walk.dense((f'dense_{j}',), feat, width)
    if j < len(widths) - 1:
      feat = walk.relu(f'relu_dense_{j}', feat)


def layer_costs(spec: models.ModelSpec, masks: Optional[Masks] = None, *,
                bn_flops_per_element: int = 0, include_softmax: bool = True
                ) -> tuple[LayerCost, ...]:
  """Per-operation costs of one forward pass at batch 1 (module docstring).

  Args:
    spec: model spec.
    masks: optional mask tree (concrete arrays).
    bn_flops_per_element: FLOPs charged per BatchNorm output element (default
      0, the TF-profiler convention).
    include_softmax: append a softmax op (5 x classes FLOPs).

  Returns:
    The operations in forward order.
  """
  if isinstance(spec, models.TEXT_SPECS):  # LSTM / transformer: text_layer_costs (end of file)
    return text_layer_costs(spec, masks, include_softmax=include_softmax)
  if not _is_spec(spec):
    raise ValueError(f'spec must be an MLPSpec, ConvNetSpec, ResNetSpec or InceptionSpec, got {type(spec)}')
  if isinstance(bn_flops_per_element, bool) or not isinstance(bn_flops_per_element, int) or (
      bn_flops_per_element < 0):
    raise ValueError(f'bn_flops_per_element must be an int >= 0, got {bn_flops_per_element!r}')
  _check_mask_paths(masks, _shape_tree(spec, False))
  walk = _Walk(masks, bn_flops_per_element)
  if isinstance(spec, models.MLPSpec):
    _walk_mlp(walk, spec)
  elif isinstance(spec, models.ConvNetSpec):
    _walk_convnet(walk, spec)
  elif isinstance(spec, models.InceptionSpec):
    _walk_inception(walk, spec)
  else:
    _walk_resnet(walk, spec)
  if include_softmax:
    walk.softmax(spec.num_classes)
  return tuple(walk.rows)


def flops(spec: models.ModelSpec, masks: Optional[Masks] = None, *,
          bn_flops_per_element: int = 0, include_softmax: bool = True) -> int:
  """Inference FLOPs at batch 1, TF-profiler convention (module docstring).

  Args:
    spec: model spec.
    masks: optional mask tree; removed filters and sparse kernels cost less
      (module docstring, "Masked FLOPs").
    bn_flops_per_element: FLOPs per BatchNorm output element (default 0).
    include_softmax: count a final softmax (5 x classes).

  Returns:
    FLOPs, a Python int.
  """
  rows = layer_costs(spec, masks, bn_flops_per_element=bn_flops_per_element,
                     include_softmax=include_softmax)
  return sum(row.flops for row in rows)


def training_flops(spec: models.ModelSpec, batch_size: int,
                   masks: Optional[Masks] = None) -> int:
  """FLOPs of one SGD step on a batch: 3 x forward MAC FLOPs x batch_size.

  The forward pass costs one set of MACs; the backward pass costs two (the
  gradient w.r.t. the layer inputs and w.r.t. the weights), each as many MACs
  as the forward. Elementwise work (bias, BN, pooling, ReLU, softmax, the
  optimizer update) is ignored. Masks shrink all three passes (sparse
  training). E.g. the LEAF FEMNIST CNN at batch 32 costs 3.30 GFLOP.

  Args:
    spec: model spec.
    batch_size: examples per step (positive int).
    masks: optional mask tree.

  Returns:
    FLOPs, a Python int.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
  mac_flops = sum(row.mac_flops for row in layer_costs(spec, masks))
  return 3 * mac_flops * batch_size


# ----------------------------------------------------------------------------
# Communication.


def _index_bytes(num_positions: int) -> int:
  """Bytes of one index into `num_positions` slots: ceil(ceil(log2 n) / 8)."""
  return -(-(max(num_positions, 1) - 1).bit_length() // 8)


def communication_bytes(params_or_spec: Any, masks: Optional[Masks] = None, *,
                        encoding: str = 'dense', dtype_bytes: int = 4,
                        include_batch_stats: bool = False) -> int:
  """Bytes of one model transfer (one direction, one client).

  Per leaf with n entries, of which nnz are kept by its mask:
    * 'dense': dtype_bytes * n (masked entries are sent as zeros);
    * 'bitmap': dtype_bytes * nnz + ceil(m / 8), the mask sent as a bitmap in
      its own (unbroadcast) shape of m elements: m = n for an unstructured
      mask, m = out for a `(1, ..., out)` channel mask;
    * 'index': dtype_bytes * nnz + k * ceil(log2(m) / 8), each of the k kept
      mask positions sent as an index into the m mask positions; for an
      unstructured mask that is nnz * (dtype_bytes + ceil(log2(n) / 8)).
  Leaves without a mask, or with a single-element mask (`()`: unpruned, or
  entirely removed), carry no mask bits: dtype_bytes * nnz.

  Args:
    params_or_spec: a model spec, or a pytree of arrays / ShapeDtypeStructs
      (e.g. `{'params': p, 'batch_stats': s}`).
    masks: optional mask tree aligned with the params (or with the pytree).
    encoding: 'dense', 'bitmap' or 'index'.
    dtype_bytes: bytes per value (4 for float32).
    include_batch_stats: with a spec, also send the BN running statistics
      (FedAvg averages them, unmasked).

  Returns:
    Bytes, a Python int.
  """
  if encoding not in ENCODINGS:
    raise ValueError(f'encoding must be one of {ENCODINGS}, got {encoding!r}')
  if isinstance(dtype_bytes, bool) or not isinstance(dtype_bytes, int) or dtype_bytes <= 0:
    raise ValueError(f'dtype_bytes must be a positive int, got {dtype_bytes!r}')
  tree = _shape_tree(params_or_spec, include_batch_stats)
  if include_batch_stats and masks is not None:
    masks = {'params': masks}
  _check_mask_paths(masks, tree)
  total = 0
  for keys, shape in _leaves_with_keys(tree):
    n = math.prod(shape)
    mask = _raw_mask(masks, keys, shape)
    if encoding == 'dense':
      total += dtype_bytes * n
      continue
    if mask is None:
      total += dtype_bytes * n
      continue
    nnz = int(np.broadcast_to(mask, shape).sum())
    total += dtype_bytes * nnz
    if mask.size == 1:
      continue  # a scalar mask is structural, not sent
    if encoding == 'bitmap':
      total += -(-mask.size // 8)
    else:
      total += int(mask.sum()) * _index_bytes(mask.size)
  return total


def round_bytes(params_or_spec: Any, masks: Optional[Masks] = None, *,
                upload_masks: Optional[Masks] = None, encoding: str = 'dense',
                dtype_bytes: int = 4, include_batch_stats: bool = False) -> RoundBytes:
  """Upload and download bytes of one client in one round.

  The server sends the (masked) model, the client sends back a (masked) model
  or update of the same structure.

  Args:
    params_or_spec: a model spec or a pytree (see `communication_bytes`).
    masks: mask of the downloaded model (and of the upload unless
      `upload_masks` is given).
    upload_masks: mask of the uploaded update when it differs (e.g. a client
      that trains a sub-model of the broadcast one).
    encoding: 'dense', 'bitmap' or 'index' (both directions).
    dtype_bytes: bytes per value.
    include_batch_stats: with a spec, send BN running statistics both ways.

  Returns:
    RoundBytes(upload, download).
  """
  kwargs = dict(encoding=encoding, dtype_bytes=dtype_bytes,
                include_batch_stats=include_batch_stats)
  download = communication_bytes(params_or_spec, masks, **kwargs)
  upload = communication_bytes(params_or_spec, masks if upload_masks is None else upload_masks,
                               **kwargs)
  return RoundBytes(upload=upload, download=download)


# ----------------------------------------------------------------------------
# Memory.


def training_memory(spec: models.ModelSpec, batch_size: int, *, optimizer_slots: int = 0,
                    masks: Optional[Masks] = None, dtype_bytes: int = 4) -> MemoryEstimate:
  """Estimated memory of one client's training step, by component.

  Device model (a client that trains a sparse/pruned model natively):
    * params: kept trainable parameters plus BN running statistics;
    * grads: one value per kept trainable parameter;
    * optimizer: `optimizer_slots` values per kept trainable parameter
      (0 for SGD, 1 for momentum, 2 for Adam);
    * masks: one bit per mask element (masks in their own shape; scalar
      masks free);
    * activations: batch_size x (input elements + every intermediate output
      in alive channels: conv/dense outputs, BN outputs, ReLU outputs, pool
      outputs, residual sums, logits), all kept for the backward pass (no
      rematerialisation, no in-place ReLU).
  This is an accounting model for comparing methods, not a measurement: XLA
  fuses elementwise ops and a dense simulation holds dense arrays.

  Args:
    spec: model spec.
    batch_size: examples per step.
    optimizer_slots: optimizer state values per parameter.
    masks: optional mask tree.
    dtype_bytes: bytes per value.

  Returns:
    MemoryEstimate with a `total`.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
  if isinstance(optimizer_slots, bool) or not isinstance(optimizer_slots, int) or (
      optimizer_slots < 0):
    raise ValueError(f'optimizer_slots must be an int >= 0, got {optimizer_slots!r}')
  kept = param_count(spec, masks)
  _, stats = models.param_shapes(spec)
  running = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(stats))
  mask_bytes = 0
  for keys, shape in _leaves_with_keys(_shape_tree(spec, False)):
    mask = _raw_mask(masks, keys, shape)
    if mask is not None and mask.size > 1:
      mask_bytes += -(-mask.size // 8)
  rows = layer_costs(spec, masks, include_softmax=False)
  per_example = math.prod(spec.input_shape) + sum(row.activations for row in rows)
  estimate = dict(params=dtype_bytes * (kept + running), grads=dtype_bytes * kept,
                  optimizer=dtype_bytes * kept * optimizer_slots, masks=mask_bytes,
                  activations=dtype_bytes * batch_size * per_example)
  return MemoryEstimate(**estimate, total=sum(estimate.values()))


def training_memory_bytes(spec: models.ModelSpec, batch_size: int, *, optimizer_slots: int = 0,
                          masks: Optional[Masks] = None, dtype_bytes: int = 4) -> int:
  """Total of `training_memory` (bytes, a Python int)."""
  return training_memory(spec, batch_size, optimizer_slots=optimizer_slots, masks=masks,
                         dtype_bytes=dtype_bytes).total


# ----------------------------------------------------------------------------
# Summary.


def summary(spec: models.ModelSpec, masks: Optional[Masks] = None, *,
            bn_flops_per_element: int = 0) -> str:
  """A table of the layers: name, op, output shape, params, FLOPs (ReLUs omitted)."""
  rows = layer_costs(spec, masks, bn_flops_per_element=bn_flops_per_element)
  header = ('layer', 'op', 'output', 'params', 'FLOPs')
  lines = [(r.name, r.op, 'x'.join(map(str, r.output_shape)), f'{r.params:,}', f'{r.flops:,}')
           for r in rows if r.op != 'relu']
  lines.append(('total', '', '', f'{param_count(spec, masks):,}',
                f'{sum(r.flops for r in rows):,}'))
  widths = [max(len(line[i]) for line in [header] + lines) for i in range(5)]
  fmt = lambda line: '  '.join(
      cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
  return '\n'.join([fmt(header), '  '.join('-' * w for w in widths)] + [fmt(l) for l in lines])


# ----------------------------------------------------------------------------
# Per-client round cost of sparse federated training (FedTiny and baselines).


class ClientRoundCost(NamedTuple):
  """One client's cost in one round (see `client_round_cost` for the definitions)."""
  training_flops: int
  peak_memory: int
  upload: int
  download: int


def client_round_cost(spec: models.ModelSpec, masks: Optional[Masks] = None, *, batch_size: int,
                      local_steps: int, optimizer_slots: int = 0, dense_grad_batches: int = 0,
                      dense_grad_layers: Optional[Sequence[str]] = None, forward_examples: int = 0,
                      topk_entries: int = 0, upload_dense_values: int = 0,
                      dtype_bytes: int = 4) -> ClientRoundCost:
  """Training FLOPs, peak memory and bytes of one client in one round of sparse FL.

  Definitions (all per client, per round; forward MAC FLOPs F(m) = 2 x kept
  MACs of conv/dense layers at batch 1 under masks m, `layer_costs`):

    * training_flops = local_steps x 3 F(m) B       (sparse forward + two
      sparse backward passes per SGD step, `training_flops`)
      + dense_grad_batches x B x (2 F(m) + F_dense(L))   (one-batch dense
      gradient for growth/importance: forward and input gradient at the
      density, weight gradient dense for the layers L = `dense_grad_layers`,
      all layers when None)
      + forward_examples x F(m)   (forward-only passes, e.g. FedTiny's
      adaptive BN selection: C statistics sweeps + C evaluations).
    * peak_memory = `training_memory(spec, B, optimizer_slots, masks).total`
      (kept weights + BN statistics, sparse gradients, optimizer slots, mask
      bitmaps, activations of one batch kept for the backward pass)
      + dtype_bytes x (entries of the dense gradient of L, when dense_grad_batches > 0)
      + topk_entries x (dtype_bytes + index bytes)   (the top-K gradient
      buffer; index bytes = ceil(log2(largest layer size) / 8)).
    * download = `communication_bytes(spec, masks, encoding)` with BN running
      statistics: kept values + a mask bitmap ('bitmap') when masks are given,
      every value ('dense') otherwise.
    * upload = the same model transfer + topk_entries x (dtype_bytes + index
      bytes) (FedTiny's sparse top-K gradients) + upload_dense_values x
      dtype_bytes (e.g. PruneFL's squared gradients of every prunable entry).

  Args:
    spec: model spec.
    masks: concrete mask tree (None = dense model).
    batch_size: B.
    local_steps: SGD steps of the round (>= 0).
    optimizer_slots: optimizer values per kept parameter (0 SGD, 1 momentum, 2 Adam).
    dense_grad_batches: mini-batches with a dense weight gradient.
    dense_grad_layers: layer names as in `layer_costs` ('conv_0', 'stage1_block0/conv1');
      None = every conv/dense layer.
    forward_examples: examples passed forward without a backward pass.
    topk_entries: K, gradient entries in the top-K buffer and upload.
    upload_dense_values: extra values uploaded densely.
    dtype_bytes: bytes per value.

  Returns:
    ClientRoundCost of Python ints.
  """
  for name, value in (('batch_size', batch_size), ('local_steps', local_steps),
                      ('dense_grad_batches', dense_grad_batches),
                      ('forward_examples', forward_examples), ('topk_entries', topk_entries),
                      ('upload_dense_values', upload_dense_values)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f'{name} must be an int >= 0, got {value!r}')
  if batch_size == 0:
    raise ValueError('batch_size must be a positive int, got 0')
  rows = layer_costs(spec, masks, include_softmax=False)
  forward = sum(row.mac_flops for row in rows)
  dense_rows = [r for r in layer_costs(spec, None, include_softmax=False) if r.mac_flops]
  if dense_grad_layers is not None:
    known = {r.name for r in dense_rows}
    unknown = sorted(set(dense_grad_layers) - known)
    if unknown:
      raise ValueError(f'dense_grad_layers {unknown} are not conv/dense layers of the spec '
                       f'(known: {sorted(known)})')
    dense_rows = [r for r in dense_rows if r.name in set(dense_grad_layers)]
  dense_weight_grad = sum(r.mac_flops for r in dense_rows)
  flops_total = (local_steps * 3 * forward * batch_size
                 + dense_grad_batches * batch_size * (2 * forward + dense_weight_grad)
                 + forward_examples * forward)
  shapes = _leaves_with_keys(_shape_tree(spec, False))
  index_bytes = _index_bytes(max(math.prod(s) for _, s in shapes))
  memory = training_memory(spec, batch_size, optimizer_slots=optimizer_slots, masks=masks,
                           dtype_bytes=dtype_bytes).total
  if dense_grad_batches:
    memory += dtype_bytes * sum(r.params for r in dense_rows)
  memory += topk_entries * (dtype_bytes + index_bytes)
  encoding = 'dense' if masks is None else 'bitmap'
  model_bytes = communication_bytes(spec, masks, encoding=encoding, dtype_bytes=dtype_bytes,
                                    include_batch_stats=True)
  upload = model_bytes + topk_entries * (dtype_bytes + index_bytes) + upload_dense_values * dtype_bytes
  return ClientRoundCost(training_flops=int(flops_total), peak_memory=int(memory),
                         upload=int(upload), download=int(model_bytes))


# ----------------------------------------------------------------------------
# Text models (models.LSTMSpec, models.TransformerSpec; `layer_costs` dispatches here).
#
# Costs of one example = one window of T = spec.seq_len tokens, same conventions as above
# (2 FLOPs per MAC, 1 per bias add and per residual add, 0 for activation functions and,
# like BatchNorm, for LayerNorm unless `norm_flops_per_element` is given):
#   * embedding lookups: 0 (a gather); the transformer's position add: T x d;
#   * LSTM layer, per step: 2 x 4H x (in + H) MAC FLOPs, 4H to add the input and the
#     recurrent projections, 4H bias adds, 4H for the cell update (f c, i g, their sum,
#     o tanh(c)); sigmoid/tanh 0; times T steps;
#   * attention, per head and block, as computed (the full T x T square, masked
#     afterwards): q k^T 2 T^2 dh, scaling T^2, softmax 5 T^2 (as the output softmax),
#     weights x v 2 T^2 dh; q/k/v/out projections and the FFN as dense layers over T
#     positions; two residual adds of T x d (none for a branch whose every output is
#     masked: a dropped block);
#   * the final LayerNorm, head and softmax (5 V) at the last position only (the
#     models' output), at all T with all_positions=True. Then every term is T times a
#     per-token cost: `text_flops_per_token` = that FLOPs count / T, exactly.
# Masks: a matmul costs its kept kernel entries whose input is alive (as `_Walk.dense`); an
# LSTM unit is alive when any of its 4 gate columns (kernel, recurrent kernel or bias) keeps
# an entry, a q/k/v/FFN column when its kernel column (reading alive inputs) or bias keeps
# one; a head's attention costs count when any of its value columns is alive, with q k^T over
# the head dims alive in both q and k. So `structured.text_keep_masks` masks give the FLOPs
# of the shrunk spec.


def _text_dense(masks, keys, alive_in: np.ndarray, out: int, positions: int
                ) -> tuple[LayerCost, np.ndarray]:
  """A dense layer over `positions` positions: (row, alive outputs)."""
  shape = (alive_in.shape[0], out)
  live = _full_mask(masks, keys + ('kernel',), shape) & alive_in[:, None]
  bias_kept = _full_mask(masks, keys + ('bias',), (out,))
  alive = live.any(axis=0) | bias_kept
  macs = positions * int(live.sum())
  params = _kept(masks, keys + ('kernel',), shape) + _kept(masks, keys + ('bias',), (out,))
  flops = 2 * macs + positions * int((alive & bias_kept).sum())
  return LayerCost('/'.join(keys), 'dense', (positions, out), params, flops, 2 * macs,
                   positions * int(alive.sum())), alive


def _text_norm(masks, keys, width: int, positions: int, per_element: int) -> LayerCost:
  alive = int((_full_mask(masks, keys + ('scale',), (width,))
               | _full_mask(masks, keys + ('bias',), (width,))).sum())
  params = _kept(masks, keys + ('scale',), (width,)) + _kept(masks, keys + ('bias',), (width,))
  return LayerCost('/'.join(keys), 'norm', (positions, width), params,
                   per_element * positions * alive, 0, positions * alive)


def _residual_add(name: str, branch_alive: np.ndarray, positions: int) -> LayerCost:
  """A residual add costs positions x d unless its branch is entirely removed (a dropped block)."""
  out = positions * branch_alive.shape[0] if branch_alive.any() else 0
  return LayerCost(name, 'add', (positions, branch_alive.shape[0]), 0, out, 0, out)


def _lstm_costs(spec, masks, positions: int) -> list[LayerCost]:
  t, v = spec.seq_len, spec.vocab_size
  rows = [LayerCost('embed', 'embed', (t, spec.embed_dim),
                    _kept(masks, ('embed', 'embedding'), (v, spec.embed_dim)), 0, 0,
                    t * spec.embed_dim)]
  alive_in = np.ones(spec.embed_dim, bool)
  for l, h in enumerate(spec.hidden):
    keys = (f'lstm_{l}',)
    kernel = _full_mask(masks, keys + ('kernel',), (alive_in.shape[0], 4 * h))
    recurrent = _full_mask(masks, keys + ('recurrent_kernel',), (h, 4 * h))
    bias = _full_mask(masks, keys + ('bias',), (4 * h,))
    col_any = (kernel & alive_in[:, None]).any(axis=0) | recurrent.any(axis=0) | bias
    alive = col_any.reshape(4, h).any(axis=0)
    cols = np.tile(alive, 4)
    n = int(alive.sum())
    macs = int((kernel & alive_in[:, None] & cols[None, :]).sum()
               + (recurrent & alive[:, None] & cols[None, :]).sum())
    step = 2 * macs + 4 * n + int((bias & cols).sum()) + 4 * n
    params = (_kept(masks, keys + ('kernel',), kernel.shape)
              + _kept(masks, keys + ('recurrent_kernel',), recurrent.shape)
              + _kept(masks, keys + ('bias',), bias.shape))
    # Kept for the backward pass per step: the 4 gates, c and h of the alive units.
    rows.append(LayerCost(keys[0], 'lstm', (t, h), params, t * step, t * 2 * macs, t * 6 * n))
    alive_in = alive
  row, _ = _text_dense(masks, ('head',), alive_in, v, positions)
  return rows + [row]


def _transformer_costs(spec, masks, positions: int, per_element: int) -> list[LayerCost]:
  t, d, v = spec.seq_len, spec.d_model, spec.vocab_size
  rows = [LayerCost('embed', 'embed', (t, d), _kept(masks, ('embed', 'embedding'), (v, d)), 0, 0,
                    t * d),
          LayerCost('pos_embed', 'add', (t, d), _kept(masks, ('pos_embed', 'embedding'), (t, d)),
                    t * d, 0, t * d)]
  stream = np.ones(d, bool)  # the residual stream is not pruned
  for l, (heads, dh, ffn) in enumerate(spec.blocks):
    b = f'block_{l}'
    rows.append(_text_norm(masks, (b, 'ln_1'), d, t, per_element))
    alive = {}
    for name in ('query', 'key', 'value'):
      row, alive[name] = _text_dense(masks, (b, 'attn', name), stream, heads * dh, t)
      rows.append(row)
    qk = (alive['query'] & alive['key']).reshape(heads, dh).sum(axis=1)
    vdims = alive['value'].reshape(heads, dh).sum(axis=1)
    live_heads = vdims > 0
    macs = t * t * int(qk[live_heads].sum() + vdims.sum())
    flops = 2 * macs + 6 * t * t * int(live_heads.sum())  # + scaling and softmax of the scores
    rows.append(LayerCost(f'{b}/attn/scores', 'attention', (heads, t, t), 0, flops, 2 * macs,
                          t * t * int(live_heads.sum())))
    row, branch = _text_dense(masks, (b, 'attn', 'out'), alive['value'], d, t)
    rows += [row, _residual_add(f'{b}/add_1', branch, t),
             _text_norm(masks, (b, 'ln_2'), d, t, per_element)]
    row, hidden = _text_dense(masks, (b, 'ffn', 'dense_0'), stream, ffn, t)
    rows += [row, LayerCost(f'{b}/ffn/gelu', 'gelu', (t, ffn), 0, 0, 0, t * int(hidden.sum()))]
    row, branch = _text_dense(masks, (b, 'ffn', 'dense_1'), hidden, d, t)
    rows += [row, _residual_add(f'{b}/add_2', branch, t)]
  rows.append(_text_norm(masks, ('ln_f',), d, positions, per_element))
  row, _ = _text_dense(masks, ('head',), stream, v, positions)
  return rows + [row]


def text_layer_costs(spec: models.TextSpec, masks: Optional[Masks] = None, *,
                     all_positions: bool = False, include_softmax: bool = True,
                     norm_flops_per_element: int = 0) -> tuple[LayerCost, ...]:
  """Per-operation costs of a text model on one example of `spec.seq_len` tokens.

  Conventions in the comment above this section; `layer_costs(spec)` calls this.

  Args:
    spec: an LSTMSpec or TransformerSpec.
    masks: optional mask tree (concrete arrays).
    all_positions: head (and final LayerNorm, softmax) at every position, as
      `apply_fn(..., all_positions=True)`; default: the last position only.
    include_softmax: append the output softmax (5 x V per output position).
    norm_flops_per_element: FLOPs per LayerNorm output element (default 0).

  Returns:
    The operations in forward order.
  """
  if not isinstance(spec, models.TEXT_SPECS):
    raise ValueError(f'spec must be an LSTMSpec or TransformerSpec, got {type(spec)}')
  if isinstance(norm_flops_per_element, bool) or not isinstance(norm_flops_per_element, int) or (
      norm_flops_per_element < 0):
    raise ValueError(f'norm_flops_per_element must be an int >= 0, got {norm_flops_per_element!r}')
  _check_mask_paths(masks, _shape_tree(spec, False))
  positions = spec.seq_len if all_positions else 1
  if isinstance(spec, models.LSTMSpec):
    rows = _lstm_costs(spec, masks, positions)
  else:
    rows = _transformer_costs(spec, masks, positions, norm_flops_per_element)
  if include_softmax:
    rows.append(LayerCost('softmax', 'softmax', (positions, spec.vocab_size), 0,
                          5 * positions * spec.vocab_size, 0, positions * spec.vocab_size))
  return tuple(rows)


def text_flops(spec: models.TextSpec, masks: Optional[Masks] = None, *, all_positions: bool = False,
               include_softmax: bool = True, norm_flops_per_element: int = 0) -> int:
  """Inference FLOPs of a text model on one example (a window of `seq_len` tokens).

  `flops(spec)` equals `text_flops(spec)` (the last position's logits, what the models
  output by default). Args as `text_layer_costs`.
  """
  return sum(row.flops for row in text_layer_costs(
      spec, masks, all_positions=all_positions, include_softmax=include_softmax,
      norm_flops_per_element=norm_flops_per_element))


def text_flops_per_token(spec: models.TextSpec, masks: Optional[Masks] = None, *,
                         include_softmax: bool = True, norm_flops_per_element: int = 0) -> int:
  """FLOPs per token when every position is predicted (language-model convention):
  `text_flops(spec, all_positions=True) / seq_len`, an exact integer (every cost is T
  times a per-position cost)."""
  total = text_flops(spec, masks, all_positions=True, include_softmax=include_softmax,
                     norm_flops_per_element=norm_flops_per_element)
  return total // spec.seq_len


# ----------------------------------------------------------------------------
# Sparse FL client cost, term by term (FedTiny vs the baselines, issue 25).


class CostTerms(NamedTuple):
  """One client's cost in one round of sparse FL, term by term (`client_cost_terms`).

  Attributes:
    compute: FLOPs per term: 'local_training', 'dense_gradient', 'forward_only'.
    memory: bytes per term: 'weights', 'gradients', 'optimizer', 'masks', 'activations',
      'dense_gradient', 'topk_buffer'.
  """
  compute: dict
  memory: dict

  @property
  def total_compute(self) -> int:
    """= `client_round_cost(...).training_flops`."""
    return sum(self.compute.values())

  @property
  def total_memory(self) -> int:
    """= `client_round_cost(...).peak_memory`."""
    return sum(self.memory.values())


def client_cost_terms(spec: models.ModelSpec, masks: Optional[Masks] = None, *, batch_size: int,
                      local_steps: int, optimizer_slots: int = 0, dense_grad_batches: int = 0,
                      dense_grad_layers: Optional[Sequence[str]] = None, forward_examples: int = 0,
                      topk_entries: int = 0, dtype_bytes: int = 4) -> CostTerms:
  """`client_round_cost`'s training FLOPs and peak memory split into their terms.

  With F(m) = 2 x kept MACs at batch 1 under masks m and B = batch_size (the arguments are
  `client_round_cost`'s; the totals are equal):

    compute  local_training  local_steps x 3 F(m) B   (sparse forward + two backward passes)
             dense_gradient  dense_grad_batches x B x (2 F(m) + F_dense(L))   (L =
                             dense_grad_layers, every conv/dense layer when None)
             forward_only    forward_examples x F(m)
    memory   weights         kept parameters + BN running statistics (`training_memory`)
             gradients       one value per kept parameter
             optimizer       optimizer_slots values per kept parameter
             masks           one bit per mask element
             activations     one batch of B examples: input + every alive intermediate output
             dense_gradient  the dense gradient of L (kernels and biases), when
                             dense_grad_batches > 0
             topk_buffer     topk_entries x (dtype_bytes + index bytes)

  What each method charges per round (its `extra_cost` in `pruning/`), so a claim such as
  FedTiny's -95.91 % compute / -94.01 % memory can be recomputed term by term:
    dense FedAvg  masks None: local_training and every memory term of the dense model.
    FedTiny       + dense_gradient of the adjusted block's layers and topk_buffer (K =
                  sum_l floor(f(t) a_l) over them) in adjustment rounds; forward_only in
                  round 0 (adaptive BN selection: C statistics + C evaluation sweeps).
    FedDST        + dense_gradient of every layer in adjustment rounds (no top-K buffer).
    PruneFL       + importance_batches dense gradients of every layer in adjustment rounds
                  (its one-client initial pruning is reported apart, not per round).
    LotteryFL     local training under its current masks (dense until its first prune).
    SNIP, SynFlow local training at the target density (the mask is computed once).
  None of these charges the server, and `activations` does not shrink with unstructured
  sparsity (only with channels that no kept weight reaches).

  Returns:
    CostTerms of Python ints.
  """
  # The same arguments, checked the same way (bad values and unknown layers raise there).
  client_round_cost(spec, masks, batch_size=batch_size, local_steps=local_steps,
                    optimizer_slots=optimizer_slots, dense_grad_batches=dense_grad_batches,
                    dense_grad_layers=dense_grad_layers, forward_examples=forward_examples,
                    topk_entries=topk_entries, dtype_bytes=dtype_bytes)
  forward = sum(row.mac_flops for row in layer_costs(spec, masks, include_softmax=False))
  dense_rows = [r for r in layer_costs(spec, None, include_softmax=False) if r.mac_flops]
  if dense_grad_layers is not None:
    dense_rows = [r for r in dense_rows if r.name in set(dense_grad_layers)]
  compute = {
      'local_training': local_steps * 3 * forward * batch_size,
      'dense_gradient': dense_grad_batches * batch_size * (
          2 * forward + sum(r.mac_flops for r in dense_rows)),
      'forward_only': forward_examples * forward,
  }
  train = training_memory(spec, batch_size, optimizer_slots=optimizer_slots, masks=masks,
                          dtype_bytes=dtype_bytes)
  shapes = _leaves_with_keys(_shape_tree(spec, False))
  index_bytes = _index_bytes(max(math.prod(s) for _, s in shapes))
  memory = {
      'weights': train.params, 'gradients': train.grads, 'optimizer': train.optimizer,
      'masks': train.masks, 'activations': train.activations,
      'dense_gradient': (dtype_bytes * sum(r.params for r in dense_rows)
                         if dense_grad_batches else 0),
      'topk_buffer': topk_entries * (dtype_bytes + index_bytes),
  }
  return CostTerms({k: int(v) for k, v in compute.items()}, {k: int(v) for k, v in memory.items()})
