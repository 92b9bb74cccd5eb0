"""Frozen width specs: the whole architecture of a model as a hashable value.

A spec is a frozen dataclass of ints, strings and tuples: hashable, usable as a
`jax.jit` static argument and as a dict key. A smaller model is just a smaller
spec (structured pruning returns a new spec, the model is rebuilt from it).
Specs validate themselves on construction and raise `ValueError` naming the
bad field.

Padding modes (for every conv):
  * `'SAME'`: TensorFlow/Keras convention, output size `ceil(size / stride)`,
    the odd pixel of padding goes to the bottom/right.
  * `'VALID'`: no padding, output size `floor((size - k) / stride) + 1`.
  * `'SYMMETRIC'`: PyTorch convention `padding=k // 2` on both sides, output
    size `floor((size + 2 * (k // 2) - k) / stride) + 1`. Equal to `'SAME'` for
    stride 1 and odd kernels; differs from it for stride 2 on even inputs
    (where the torch window starts one pixel earlier).

Max-pooling uses non-overlapping windows (stride = window) with VALID floor
semantics: the feature map is cropped to a multiple of the window first
(e.g. 21 -> 10 for window 2).

BatchNorm modes (`norm`):
  * `'none'`: no BatchNorm layers.
  * `'batch_running'`: BN with running statistics, updated in train mode and
    used in eval mode (momentum 0.9 in the Flax convention = PyTorch 0.1,
    eps 1e-5). FedAvg averages these statistics.
  * `'batch_static'`: batch statistics in train *and* eval, no running
    statistics stored ("static BN" of HeteroFL/FIARSE).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

NORM_MODES = ('none', 'batch_running', 'batch_static')
PADDING_MODES = ('SAME', 'VALID', 'SYMMETRIC')
HEAD_MODES = ('flatten', 'gap')


# ----------------------------------------------------------------------------
# Validation helpers (host-side, on Python ints).


def _positive_int(value, field: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{field} must be a positive int, got {value!r}')
  return value


def _pair(value, field: str) -> tuple[int, int]:
  if isinstance(value, int) and not isinstance(value, bool):
    value = (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f'{field} must be an int or a pair of ints, got {value!r}')
  return tuple(_positive_int(v, field) for v in value)


def _int_tuple(value, field: str, *, allow_empty: bool = True) -> tuple[int, ...]:
  try:
    value = tuple(value)
  except TypeError:
    raise ValueError(f'{field} must be a tuple of positive ints, got {value!r}') from None
  if not value and not allow_empty:
    raise ValueError(f'{field} must not be empty')
  return tuple(_positive_int(v, f'{field}[{i}]') for i, v in enumerate(value))


def _choice(value, allowed: tuple[str, ...], field: str) -> str:
  if value not in allowed:
    raise ValueError(f'{field} must be one of {allowed}, got {value!r}')
  return value


# ----------------------------------------------------------------------------
# Shape arithmetic shared by the models and by `fedjax_prune.accounting`.


def padding_pairs(size_hw: tuple[int, int], kernel_hw: tuple[int, int],
                  stride_hw: tuple[int, int],
                  padding: str) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit `((top, bottom), (left, right))` padding of a conv.

  Args:
    size_hw: input spatial size (H, W).
    kernel_hw: kernel size (kh, kw).
    stride_hw: strides (sh, sw).
    padding: 'SAME', 'VALID' or 'SYMMETRIC' (see the module docstring).

  Returns:
    Two (low, high) pairs, for H and for W.
  """
  _choice(padding, PADDING_MODES, 'padding')
  pairs = []
  for size, k, s in zip(size_hw, kernel_hw, stride_hw):
    if padding == 'VALID':
      pairs.append((0, 0))
    elif padding == 'SYMMETRIC':
      pairs.append((k // 2, k // 2))
    else:
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pairs.append((total // 2, total - total // 2))
  return tuple(pairs)


def conv_output_hw(size_hw: tuple[int, int], kernel_hw: tuple[int, int],
                   stride_hw: tuple[int, int], padding: str) -> tuple[int, int]:
  """Spatial output size (Ho, Wo) of a conv; may be <= 0 for an impossible conv."""
  pads = padding_pairs(size_hw, kernel_hw, stride_hw, padding)
  return tuple((size + lo + hi - k) // s + 1
               for size, (lo, hi), k, s in zip(size_hw, pads, kernel_hw, stride_hw))


def pool_output_hw(size_hw: tuple[int, int], window: Optional[int]) -> tuple[int, int]:
  """Spatial size after a non-overlapping max-pool with VALID floor semantics."""
  if window is None:
    return tuple(size_hw)
  return tuple(size // window for size in size_hw)


def _check_hw(hw: tuple[int, int], field: str, what: str) -> None:
  if min(hw) <= 0:
    raise ValueError(f'{field}: spatial size collapses to {hw} after {what}; '
                     'use a larger input_shape or fewer strides/pools')


# ----------------------------------------------------------------------------
# Specs.


@dataclasses.dataclass(frozen=True)
class MLPSpec:
  """Multi-layer perceptron: flatten -> [dense -> ReLU] * len(hidden) -> dense.

  Attributes:
    input_shape: shape of one example (flattened inside the model).
    hidden: widths of the hidden dense layers (may be empty: logistic regression).
    num_classes: number of output logits.
  """
  input_shape: tuple[int, ...]
  hidden: tuple[int, ...]
  num_classes: int

  def __post_init__(self):
    object.__setattr__(self, 'input_shape',
                       _int_tuple(self.input_shape, 'MLPSpec.input_shape', allow_empty=False))
    object.__setattr__(self, 'hidden', _int_tuple(self.hidden, 'MLPSpec.hidden'))
    _positive_int(self.num_classes, 'MLPSpec.num_classes')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvSpec:
  """One conv layer of a `ConvNetSpec`: conv -> [BN] -> ReLU -> [max-pool].

  Attributes:
    features: number of output channels (filters).
    kernel: kernel size, int or (kh, kw).
    stride: stride, int or (sh, sw).
    padding: 'SAME', 'VALID' or 'SYMMETRIC' (module docstring).
    pool: None, or the window (= stride) of a max-pool after the ReLU; VALID
      floor semantics.
    norm: whether a BatchNorm follows the conv (its kind is the net's `norm`).
    bias: whether the conv has a bias (usually False when `norm` is True, since
      BN's shift makes it redundant).
  """
  features: int
  kernel: Union[int, tuple[int, int]] = 3
  stride: Union[int, tuple[int, int]] = 1
  padding: str = 'SAME'
  pool: Optional[int] = None
  norm: bool = False
  bias: bool = True

  def __post_init__(self):
    _positive_int(self.features, 'ConvSpec.features')
    object.__setattr__(self, 'kernel', _pair(self.kernel, 'ConvSpec.kernel'))
    object.__setattr__(self, 'stride', _pair(self.stride, 'ConvSpec.stride'))
    _choice(self.padding, PADDING_MODES, 'ConvSpec.padding')
    if self.pool is not None:
      _positive_int(self.pool, 'ConvSpec.pool')
    object.__setattr__(self, 'norm', bool(self.norm))
    object.__setattr__(self, 'bias', bool(self.bias))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvNetSpec:
  """Sequential CNN: convs -> head ('flatten' or 'gap') -> hidden denses -> logits.

  Each conv is conv -> [BN] -> ReLU -> [max-pool]; each hidden dense is
  dense -> ReLU; the last dense gives `num_classes` logits. Dense layers never
  have BN.

  Attributes:
    input_shape: (H, W, C) of one example.
    convs: the conv layers, in order.
    num_classes: number of output logits.
    head: 'flatten' (NHWC row-major flatten) or 'gap' (global average pool).
    hidden: widths of the dense layers between the head and the logits.
    norm: BatchNorm mode for the convs with `norm=True`: 'batch_running' or
      'batch_static'; 'none' requires every conv to have `norm=False`.
  """
  input_shape: tuple[int, int, int]
  convs: tuple[ConvSpec, ...]
  num_classes: int
  head: str = 'flatten'
  hidden: tuple[int, ...] = ()
  norm: str = 'none'

  def __post_init__(self):
    shape = _int_tuple(self.input_shape, 'ConvNetSpec.input_shape')
    if len(shape) != 3:
      raise ValueError(f'ConvNetSpec.input_shape must be (H, W, C), got {self.input_shape!r}')
    object.__setattr__(self, 'input_shape', shape)
    convs = tuple(self.convs)
    for i, conv in enumerate(convs):
      if not isinstance(conv, ConvSpec):
        raise ValueError(f'ConvNetSpec.convs[{i}] must be a ConvSpec, got {conv!r}')
    object.__setattr__(self, 'convs', convs)
    _positive_int(self.num_classes, 'ConvNetSpec.num_classes')
    _choice(self.head, HEAD_MODES, 'ConvNetSpec.head')
    object.__setattr__(self, 'hidden', _int_tuple(self.hidden, 'ConvNetSpec.hidden'))
    _choice(self.norm, NORM_MODES, 'ConvNetSpec.norm')
    if self.norm == 'none':
      for i, conv in enumerate(convs):
        if conv.norm:
          raise ValueError(f"ConvNetSpec.convs[{i}].norm is True but ConvNetSpec.norm is 'none'")
    hw = shape[:2]
    for i, conv in enumerate(convs):
      hw = conv_output_hw(hw, conv.kernel, conv.stride, conv.padding)
      _check_hw(hw, f'ConvNetSpec.convs[{i}]', 'the conv')
      hw = pool_output_hw(hw, conv.pool)
      _check_hw(hw, f'ConvNetSpec.convs[{i}]', 'the max-pool')

  def feature_shapes(self) -> tuple[tuple[int, int, int], ...]:
    """(H, W, C) after each conv layer (after its pool), in order."""
    hw, shapes = self.input_shape[:2], []
    for conv in self.convs:
      hw = pool_output_hw(conv_output_hw(hw, conv.kernel, conv.stride, conv.padding), conv.pool)
      shapes.append((*hw, conv.features))
    return tuple(shapes)

  def head_features(self) -> int:
    """Width of the vector entering the first dense layer."""
    h, w, c = self.feature_shapes()[-1] if self.convs else self.input_shape
    return h * w * c if self.head == 'flatten' else c


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetSpec:
  """ResNet with BasicBlocks: stem -> stages of blocks -> head -> logits.

  stem: conv(stem_kernel, stem_stride) -> [BN] -> ReLU -> [max-pool(stem_pool)].
  BasicBlock of stage s with inner width m and residual width w (input width
  w_in, stride st for the first block of the stage, 1 for the others):
  conv3x3(w_in -> m, st) -> [BN] -> ReLU -> conv3x3(m -> w) -> [BN], plus the
  shortcut (identity, or conv1x1(w_in -> w, st) -> [BN] when st != 1 or
  w_in != w), add, ReLU. Head: global average pool ('gap') or flatten, then a
  dense layer with bias.

  The residual-stream width of a stage (`stage_widths`) is coupled across all
  blocks of the stage (they are added together); the inner width of each block
  (`inner_widths`) is free, which is what structured pruning shrinks.

  Attributes:
    input_shape: (H, W, C) of one example.
    num_classes: number of output logits.
    stem_width: output channels of the stem conv.
    stage_widths: residual-stream width of each stage.
    stage_strides: stride of the first block of each stage.
    inner_widths: per stage, the inner (first conv) width of each block; the
      number of blocks of a stage is `len(inner_widths[s])`.
    norm: BatchNorm mode: 'none', 'batch_running' or 'batch_static'.
    stem_kernel: stem conv kernel size.
    stem_stride: stem conv stride.
    stem_pool: None or the stem max-pool window.
    conv_bias: whether convs have a bias (False for torch ResNets with BN).
    padding: 'SAME' (Keras) or 'SYMMETRIC' (PyTorch, `padding=k // 2`) for
      every conv.
    head: 'gap' or 'flatten'.
  """
  input_shape: tuple[int, int, int]
  num_classes: int
  stem_width: int
  stage_widths: tuple[int, ...]
  stage_strides: tuple[int, ...]
  inner_widths: tuple[tuple[int, ...], ...]
  norm: str = 'batch_running'
  stem_kernel: int = 3
  stem_stride: int = 1
  stem_pool: Optional[int] = None
  conv_bias: bool = False
  padding: str = 'SYMMETRIC'
  head: str = 'gap'

  def __post_init__(self):
    shape = _int_tuple(self.input_shape, 'ResNetSpec.input_shape')
    if len(shape) != 3:
      raise ValueError(f'ResNetSpec.input_shape must be (H, W, C), got {self.input_shape!r}')
    object.__setattr__(self, 'input_shape', shape)
    _positive_int(self.num_classes, 'ResNetSpec.num_classes')
    _positive_int(self.stem_width, 'ResNetSpec.stem_width')
    stage_widths = _int_tuple(self.stage_widths, 'ResNetSpec.stage_widths', allow_empty=False)
    stage_strides = _int_tuple(self.stage_strides, 'ResNetSpec.stage_strides', allow_empty=False)
    if len(stage_strides) != len(stage_widths):
      raise ValueError(f'ResNetSpec.stage_strides has {len(stage_strides)} entries but '
                       f'stage_widths has {len(stage_widths)}')
    try:
      inner = tuple(self.inner_widths)
    except TypeError:
      raise ValueError('ResNetSpec.inner_widths must be a tuple of tuples of ints') from None
    if len(inner) != len(stage_widths):
      raise ValueError(f'ResNetSpec.inner_widths has {len(inner)} stages but '
                       f'stage_widths has {len(stage_widths)}')
    inner = tuple(_int_tuple(w, f'ResNetSpec.inner_widths[{s}]', allow_empty=False)
                  for s, w in enumerate(inner))
    object.__setattr__(self, 'stage_widths', stage_widths)
    object.__setattr__(self, 'stage_strides', stage_strides)
    object.__setattr__(self, 'inner_widths', inner)
    _choice(self.norm, NORM_MODES, 'ResNetSpec.norm')
    _positive_int(self.stem_kernel, 'ResNetSpec.stem_kernel')
    _positive_int(self.stem_stride, 'ResNetSpec.stem_stride')
    if self.stem_pool is not None:
      _positive_int(self.stem_pool, 'ResNetSpec.stem_pool')
    object.__setattr__(self, 'conv_bias', bool(self.conv_bias))
    _choice(self.padding, ('SAME', 'SYMMETRIC'), 'ResNetSpec.padding')
    _choice(self.head, HEAD_MODES, 'ResNetSpec.head')
    hw = conv_output_hw(shape[:2], (self.stem_kernel,) * 2, (self.stem_stride,) * 2,
                        self.padding)
    _check_hw(hw, 'ResNetSpec.stem_stride', 'the stem conv')
    hw = pool_output_hw(hw, self.stem_pool)
    _check_hw(hw, 'ResNetSpec.stem_pool', 'the stem max-pool')
    for s, stride in enumerate(stage_strides):
      hw = conv_output_hw(hw, (3, 3), (stride, stride), self.padding)
      _check_hw(hw, f'ResNetSpec.stage_strides[{s}]', f'stage {s + 1}')

  def blocks(self) -> tuple[tuple[str, int, int, int, int], ...]:
    """Every block as (name, in_width, inner_width, out_width, stride), in order.

    Names are `'stage{s}_block{b}'` with s counted from 1 (as torch's layer1..4)
    and b from 0.
    """
    rows, in_width = [], self.stem_width
    for s, (width, stride, inner) in enumerate(
        zip(self.stage_widths, self.stage_strides, self.inner_widths)):
      for b, inner_width in enumerate(inner):
        rows.append((f'stage{s + 1}_block{b}', in_width, inner_width, width,
                     stride if b == 0 else 1))
        in_width = width
    return tuple(rows)


ModelSpec = Union[MLPSpec, ConvNetSpec, ResNetSpec]


def block_has_shortcut_conv(in_width: int, out_width: int, stride: int) -> bool:
  """A BasicBlock uses a 1x1 conv shortcut when stride != 1 or widths differ."""
  return stride != 1 or in_width != out_width


# ----------------------------------------------------------------------------
# Presets.


def mlp(input_shape: tuple[int, ...] = (28, 28, 1), hidden: tuple[int, ...] = (200, 200),
        num_classes: int = 10) -> MLPSpec:
  """An MLP spec (default: the 2x200 MNIST MLP of McMahan et al. 2017)."""
  return MLPSpec(input_shape=tuple(input_shape), hidden=tuple(hidden), num_classes=num_classes)


def leaf_femnist_cnn(num_classes: int = 62, widths: tuple[int, int] = (32, 64),
                     dense_width: int = 2048,
                     input_shape: tuple[int, int, int] = (28, 28, 1)) -> ConvNetSpec:
  """LEAF FEMNIST CNN: conv5x5(32, same) -> pool2 -> conv5x5(64, same) -> pool2 -> 2048 -> 62.

  6,603,710 parameters at the default widths (Caldas et al., LEAF, 2018).
  """
  c1, c2 = widths
  return ConvNetSpec(
      input_shape=input_shape,
      convs=(ConvSpec(features=c1, kernel=5, padding='SAME', pool=2),
             ConvSpec(features=c2, kernel=5, padding='SAME', pool=2)),
      head='flatten', hidden=(dense_width,), num_classes=num_classes, norm='none')


def asp_femnist_cnn(widths: tuple[int, int] = (32, 64), num_classes: int = 62,
                    input_shape: tuple[int, int, int] = (28, 28, 1)) -> ConvNetSpec:
  """FEMNIST CNN of the automatic-structured-pruning paper (arXiv 2411.01759).

  conv5x5(valid) -> ReLU -> pool2 -> conv5x5(valid) -> ReLU -> pool2 -> GAP ->
  dense(62). 56,126 parameters at widths (32, 64).
  """
  return ConvNetSpec(
      input_shape=input_shape,
      convs=tuple(ConvSpec(features=w, kernel=5, padding='VALID', pool=2) for w in widths),
      head='gap', num_classes=num_classes, norm='none')


def asp_celeba_cnn(widths: tuple[int, ...] = (32, 32, 32, 32), num_classes: int = 2,
                   input_shape: tuple[int, int, int] = (84, 84, 3)) -> ConvNetSpec:
  """CelebA CNN of the automatic-structured-pruning paper (arXiv 2411.01759).

  4 x [conv5x5(same) -> ReLU -> pool2] (84 -> 42 -> 21 -> 10 -> 5, floor) ->
  flatten -> dense(2). 80,930 parameters at widths 4 x 32.
  """
  return ConvNetSpec(
      input_shape=input_shape,
      convs=tuple(ConvSpec(features=w, kernel=5, padding='SAME', pool=2) for w in widths),
      head='flatten', num_classes=num_classes, norm='none')


def vgg11(num_classes: int = 10, norm: str = 'batch_running',
          widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512, 512, 512),
          input_shape: tuple[int, int, int] = (32, 32, 3)) -> ConvNetSpec:
  """CIFAR VGG-11 (torchvision cfg 'A') with a CIFAR-style 512 -> classes head.

  conv3x3 widths 64,M,128,M,256,256,M,512,512,M,512,512,M ('M' = max-pool 2),
  each conv -> BN -> ReLU (BN unless `norm='none'`; convs have a bias only
  without BN), then flatten (1x1x512 on 32x32 inputs) and one dense layer
  512 -> classes. This is the CIFAR head used by HeteroFL-style code, not
  torchvision's 7x7-avgpool + 4096-4096 ImageNet classifier (the FedTiny port's
  choice is unverified).

  Args:
    num_classes: number of logits.
    norm: 'none', 'batch_running' or 'batch_static'.
    widths: the 8 conv widths (pools stay after convs 0, 1, 3, 5, 7).
    input_shape: (H, W, C).
  """
  _choice(norm, NORM_MODES, 'vgg11 norm')
  widths = _int_tuple(widths, 'vgg11 widths')
  if len(widths) != 8:
    raise ValueError(f'vgg11 widths must have 8 entries, got {len(widths)}')
  pooled = (0, 1, 3, 5, 7)
  use_bn = norm != 'none'
  convs = tuple(ConvSpec(features=w, kernel=3, padding='SAME', pool=2 if i in pooled else None,
                         norm=use_bn, bias=not use_bn) for i, w in enumerate(widths))
  return ConvNetSpec(input_shape=input_shape, convs=convs, head='flatten', hidden=(),
                     num_classes=num_classes, norm=norm)


def _scaled(width: int, multiplier: float) -> int:
  return max(1, int(round(width * multiplier)))


def resnet18(num_classes: int = 10, norm: str = 'batch_running', width_multiplier: float = 1.0,
             input_shape: tuple[int, int, int] = (32, 32, 3)) -> ResNetSpec:
  """CIFAR ResNet-18 exactly as FIARSE's `fiarse/model/resnet.py` (github.com/HarliWu/FIARSE).

  conv3x3(3 -> 64, stride 1, no bias) -> BN -> ReLU -> 4 stages x 2 BasicBlocks
  (widths 64/128/256/512, strides 1/2/2/2) -> GAP -> Linear(512 -> C, bias).
  No max-pool. 11,173,962 trainable parameters for C = 10.

  Args:
    num_classes: number of logits.
    norm: 'none', 'batch_running' or 'batch_static'.
    width_multiplier: scales every width (rounded, at least 1); use small
      values for tests.
    input_shape: (H, W, C).
  """
  if not (isinstance(width_multiplier, (int, float)) and width_multiplier > 0):
    raise ValueError(f'resnet18 width_multiplier must be > 0, got {width_multiplier!r}')
  widths = tuple(_scaled(w, width_multiplier) for w in (64, 128, 256, 512))
  return ResNetSpec(
      input_shape=input_shape, num_classes=num_classes,
      stem_width=_scaled(64, width_multiplier), stage_widths=widths,
      stage_strides=(1, 2, 2, 2), inner_widths=tuple((w, w) for w in widths), norm=norm,
      stem_kernel=3, stem_stride=1, stem_pool=None, conv_bias=False, padding='SYMMETRIC',
      head='gap')


def cifar_resnet(depth: int = 20, num_classes: int = 10, norm: str = 'batch_running',
                 width_multiplier: float = 1.0,
                 input_shape: tuple[int, int, int] = (32, 32, 3)) -> ResNetSpec:
  """CIFAR ResNet-(6n+2) of He et al. (2016, §4.2): 3 stages of n BasicBlocks.

  conv3x3(3 -> 16, no bias) -> BN -> ReLU -> stages of widths 16/32/64 with
  strides 1/2/2, n = (depth - 2) / 6 blocks each -> GAP -> Linear(64 -> C).
  Shortcuts are 1x1 conv + BN where the width or stride changes (option B;
  the original paper's CIFAR nets use zero-padding option A, parameter-free).
  For C = 10: ResNet-20 has 272,474 trainable parameters here (269,722 with
  option A; the two projection shortcuts add 2,752) and 81,716,540 FLOPs
  (`accounting.flops`); ResNet-56 855,770 parameters, 251,757,884 FLOPs.

  Args:
    depth: 6n + 2 (20, 32, 44, 56, 110, ...).
    num_classes: number of logits.
    norm: 'none', 'batch_running' or 'batch_static'.
    width_multiplier: scales every width (rounded, at least 1).
    input_shape: (H, W, C).
  """
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f'cifar_resnet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), '
                     f'got {depth!r}')
  if not (isinstance(width_multiplier, (int, float)) and width_multiplier > 0):
    raise ValueError(f'cifar_resnet width_multiplier must be > 0, got {width_multiplier!r}')
  n = (depth - 2) // 6
  widths = tuple(_scaled(w, width_multiplier) for w in (16, 32, 64))
  return ResNetSpec(
      input_shape=input_shape, num_classes=num_classes, stem_width=widths[0],
      stage_widths=widths, stage_strides=(1, 2, 2), inner_widths=tuple((w,) * n for w in widths),
      norm=norm, stem_kernel=3, stem_stride=1, stem_pool=None, conv_bias=False,
      padding='SYMMETRIC', head='gap')


def resnet20(**kwargs) -> ResNetSpec:
  """CIFAR ResNet-20 (`cifar_resnet(depth=20, **kwargs)`)."""
  return cifar_resnet(depth=20, **kwargs)


def resnet56(**kwargs) -> ResNetSpec:
  """CIFAR ResNet-56 (`cifar_resnet(depth=56, **kwargs)`)."""
  return cifar_resnet(depth=56, **kwargs)


def asp_resnet(widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 2,
               input_shape: tuple[int, int, int] = (84, 84, 3),
               norm: str = 'batch_running') -> ResNetSpec:
  """ResNet-style model of the automatic-structured-pruning paper (arXiv 2411.01759).

  widths = [c0, c1, ..., cn]: stem conv3x3(c0, stride 2, same, bias) -> BN ->
  ReLU -> max-pool 2; then for each c_i (i >= 1) one block of inner width c_i,
  stride 2, residual width c0, conv1x1 shortcut; flatten -> dense. 30,626
  Keras parameters (30,274 trainable + 352 BN moving statistics) for CelebA
  [16, 32, 64]. The stem max-pool uses VALID floor semantics; Keras' 'same'
  pool gives the same size for even feature maps (84 -> 42 -> 21).
  """
  widths = _int_tuple(widths, 'asp_resnet widths', allow_empty=False)
  if len(widths) < 2:
    raise ValueError(f'asp_resnet widths needs a stem width and >= 1 block width, got {widths}')
  c0, blocks = widths[0], widths[1:]
  return ResNetSpec(
      input_shape=input_shape, num_classes=num_classes, stem_width=c0,
      stage_widths=(c0,) * len(blocks), stage_strides=(2,) * len(blocks),
      inner_widths=tuple((c,) for c in blocks), norm=norm, stem_kernel=3, stem_stride=2,
      stem_pool=2, conv_bias=True, padding='SAME', head='flatten')
