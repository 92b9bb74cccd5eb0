"""Channel groups of a model: which output channels are one prunable unit.

A *group* is a set of output channels that must be removed together: the
filters of one conv (or the units of one hidden dense layer), or, in a ResNet,
the residual stream of a stage (stem / block outputs / projection shortcuts
whose outputs are added share one width). Every group has

  * `name`: the '/'-joined param path of its first producer ('conv_0',
    'stem/conv', 'stage2_block0/conv2', 'inception0/conv3x3');
  * `producers`: param paths of the layers whose last kernel axis (and bias)
    are the group's channels;
  * `norms`: param paths of BatchNorms over the group (scale/bias, and the
    same path in batch_stats for mean/var);
  * `width`: number of channels.

Every kernel-bearing layer also has an input *layout*: its input axis as a
concatenation of segments, each the channels of one group (or of the input /
an unprunable tensor, group None), repeated `positions` times for a dense
after an NHWC flatten (input index = p * sum(segment widths) + offset + c).

Nothing here touches arrays; it is host-side bookkeeping over a spec.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

from fedjax_prune import models
from fedjax_prune.models import _inception

Path = tuple[str, ...]


class Group(NamedTuple):
  """A set of output channels pruned together (module docstring)."""
  name: str
  producers: tuple[Path, ...]
  norms: tuple[Path, ...]
  width: int
  kind: str  # 'conv' or 'dense'


class Layer(NamedTuple):
  """A kernel-bearing layer: where its input channels come from.

  Attributes:
    path: param path of the layer (a dict with 'kernel' and maybe 'bias').
    in_segments: the input axis as ((group name or None, width), ...).
    positions: spatial copies of the input channels (NHWC flatten), else 1.
    out_group: name of the group of its output channels, None for the logits.
  """
  path: Path
  in_segments: tuple[tuple[Optional[str], int], ...]
  positions: int
  out_group: Optional[str]


class Graph(NamedTuple):
  groups: tuple[Group, ...]
  layers: tuple[Layer, ...]

  def group(self, name: str) -> Group:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(name)


def _join(path: Path) -> str:
  return '/'.join(path)


class _Builder:
  """Collects groups and layers in forward order."""

  def __init__(self):
    self.groups: dict[str, dict] = {}
    self.layers: list[Layer] = []

  def new_group(self, producer: Path, width: int, kind: str = 'conv') -> str:
    name = _join(producer)
    self.groups[name] = dict(producers=[producer], norms=[], width=width, kind=kind)
    return name

  def join_group(self, name: str, producer: Path) -> None:
    self.groups[name]['producers'].append(producer)

  def norm(self, name: str, path: Path) -> None:
    self.groups[name]['norms'].append(path)

  def layer(self, path: Path, segments, out_group: Optional[str], positions: int = 1) -> None:
    self.layers.append(Layer(path, tuple(segments), positions, out_group))

  def graph(self) -> Graph:
    groups = tuple(Group(name, tuple(g['producers']), tuple(g['norms']), g['width'], g['kind'])
                   for name, g in self.groups.items())
    return Graph(groups, tuple(self.layers))


def _dense_stack(b: _Builder, segments, positions: int, widths: tuple[int, ...]) -> None:
  """dense_0 .. dense_{n-1}: hidden ones are groups, the last gives the logits."""
  for j, width in enumerate(widths):
    path = (f'dense_{j}',)
    last = j == len(widths) - 1
    out = None if last else b.new_group(path, width, 'dense')
    b.layer(path, segments, out, positions)
    segments, positions = ((out, width),), 1


def _mlp(spec: models.MLPSpec) -> Graph:
  b = _Builder()
  _dense_stack(b, ((None, math.prod(spec.input_shape)),), 1,
               spec.hidden + (spec.num_classes,))
  return b.graph()


def _convnet(spec: models.ConvNetSpec) -> Graph:
  b = _Builder()
  segments = ((None, spec.input_shape[-1]),)
  for i, conv in enumerate(spec.convs):
    name = b.new_group((f'conv_{i}',), conv.features)
    b.layer((f'conv_{i}',), segments, name)
    if conv.norm:
      b.norm(name, (f'bn_{i}',))
    segments = ((name, conv.features),)
  positions = 1
  if spec.head == 'flatten':
    h, w, _ = spec.feature_shapes()[-1] if spec.convs else spec.input_shape
    positions = h * w
  _dense_stack(b, segments, positions, spec.hidden + (spec.num_classes,))
  return b.graph()


def _resnet(spec: models.ResNetSpec) -> Graph:
  b = _Builder()
  use_bn = spec.norm != 'none'
  stream = b.new_group(('stem', 'conv'), spec.stem_width)
  b.layer(('stem', 'conv'), ((None, spec.input_shape[-1]),), stream)
  if use_bn:
    b.norm(stream, ('stem', 'bn'))
  for name, in_width, inner_width, out_width, stride in spec.blocks():
    inner = b.new_group((name, 'conv1'), inner_width)
    b.layer((name, 'conv1'), ((stream, in_width),), inner)
    if use_bn:
      b.norm(inner, (name, 'bn1'))
    if models.block_has_shortcut_conv(in_width, out_width, stride):
      out = b.new_group((name, 'conv2'), out_width)
      b.join_group(out, (name, 'shortcut_conv'))
      b.layer((name, 'shortcut_conv'), ((stream, in_width),), out)
      if use_bn:
        b.norm(out, (name, 'shortcut_bn'))
    else:
      out = stream  # identity shortcut: the block output is added to the same channels
      b.join_group(out, (name, 'conv2'))
    b.layer((name, 'conv2'), ((inner, inner_width),), out)
    if use_bn:
      b.norm(out, (name, 'bn2'))
    stream = out
  positions = 1
  if spec.head == 'flatten':
    h, w = _resnet_final_hw(spec)
    positions = h * w
  b.layer(('head',), ((stream, spec.stage_widths[-1]),), None, positions)
  return b.graph()


def _resnet_final_hw(spec: models.ResNetSpec) -> tuple[int, int]:
  k, s = spec.stem_kernel, spec.stem_stride
  hw = models.conv_output_hw(spec.input_shape[:2], (k, k), (s, s), spec.padding)
  hw = models.pool_output_hw(hw, spec.stem_pool)
  for stride in spec.stage_strides:
    hw = models.conv_output_hw(hw, (3, 3), (stride, stride), spec.padding)
  return hw


def _inception_graph(spec: models.InceptionSpec) -> Graph:
  b = _Builder()
  stem = b.new_group(('stem',), spec.stem_width)
  b.layer(('stem',), ((None, spec.input_shape[-1]),), stem)
  segments = ((stem, spec.stem_width),)
  for m, widths in enumerate(spec.modules):
    branch_segments = []
    for branch, width in zip(_inception.BRANCH_NAMES, widths):
      path = (f'inception{m}', branch)
      name = b.new_group(path, width)
      b.layer(path, segments, name)
      branch_segments.append((name, width))
    segments = tuple(branch_segments)  # channel concat, in branch order
  for i, width in enumerate(spec.reduce_widths):
    name = b.new_group((f'conv_{i}',), width)
    b.layer((f'conv_{i}',), segments, name)
    segments = ((name, width),)
  _dense_stack(b, segments, 1, spec.hidden + (spec.num_classes,))
  return b.graph()


def graph(spec) -> Graph:
  """The channel groups and layers of `spec` (module docstring)."""
  if isinstance(spec, models.MLPSpec):
    return _mlp(spec)
  if isinstance(spec, models.ConvNetSpec):
    return _convnet(spec)
  if isinstance(spec, models.ResNetSpec):
    return _resnet(spec)
  if isinstance(spec, models.InceptionSpec):
    return _inception_graph(spec)
  raise ValueError('spec must be an MLPSpec, ConvNetSpec, ResNetSpec or InceptionSpec, got '
                   f'{type(spec).__name__}')


def resize(spec, widths: dict[str, int]):
  """The spec with each group's width replaced by `widths[group name]` (others unchanged)."""
  g = graph(spec)
  w = {grp.name: widths.get(grp.name, grp.width) for grp in g.groups}
  if isinstance(spec, models.MLPSpec):
    hidden = tuple(w[f'dense_{j}'] for j in range(len(spec.hidden)))
    return models.MLPSpec(spec.input_shape, hidden, spec.num_classes)
  if isinstance(spec, models.ConvNetSpec):
    convs = tuple(dataclasses.replace(c, features=w[f'conv_{i}']) for i, c in enumerate(spec.convs))
    hidden = tuple(w[f'dense_{j}'] for j in range(len(spec.hidden)))
    return dataclasses.replace(spec, convs=convs, hidden=hidden)
  if isinstance(spec, models.ResNetSpec):
    stream_of = {}  # block name -> group of its output
    for layer in g.layers:
      if len(layer.path) == 2 and layer.path[1] == 'conv2':
        stream_of[layer.path[0]] = layer.out_group
    blocks = spec.blocks()
    stage_widths, inner_widths, b = [], [], 0
    for inner in spec.inner_widths:
      rows = blocks[b:b + len(inner)]
      stage_widths.append(w[stream_of[rows[-1][0]]])
      inner_widths.append(tuple(w[f'{row[0]}/conv1'] for row in rows))
      b += len(inner)
    new = dataclasses.replace(spec, stem_width=w['stem/conv'], stage_widths=tuple(stage_widths),
                              inner_widths=tuple(inner_widths))
    for (name, i0, _, o0, s0), (_, i1, _, o1, s1) in zip(blocks, new.blocks()):
      if (models.block_has_shortcut_conv(i0, o0, s0)
          != models.block_has_shortcut_conv(i1, o1, s1)):
        raise ValueError(f'keep makes the input and output widths of {name} equal ({i1}), which '
                         'would turn its projection shortcut into an identity: keep a different '
                         'number of channels in one of the two groups')
    return new
  modules = tuple(tuple(w[f'inception{m}/{n}'] for n in _inception.BRANCH_NAMES)
                  for m in range(len(spec.modules)))
  return dataclasses.replace(
      spec, stem_width=w['stem'], modules=modules,
      reduce_widths=tuple(w[f'conv_{i}'] for i in range(len(spec.reduce_widths))),
      hidden=tuple(w[f'dense_{j}'] for j in range(len(spec.hidden))))
