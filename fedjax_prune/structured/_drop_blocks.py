"""Whole-block (layer) removal for ResNets: a smaller spec and renamed params.

A BasicBlock whose shortcut is the identity computes `relu(x + branch(x))`;
its input `x` is the output of a ReLU (stem or previous block), so with the
branch switched off (`branch = 0`, a layer gate at 0) the block is
`relu(x) = x`, the identity, and can be deleted outright. Blocks with a
projection shortcut (first block of a stage that changes stride or width)
keep `relu(bn(conv1x1(x)))` without their branch; `ResNetSpec` has no
"shortcut-only" block, so they are not removable here (callers put no layer
gate on them).

Blocks are named by position (`stage{s}_block{b}`), so removing one renames
the later blocks of its stage; a stage left without blocks is removed (it can
only hold identity blocks: stride 1, same width as its input) and the later
stages are renumbered. Host-side, never jitted.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from fedjax_prune import models
from fedjax_prune.types import BatchStats, Params


def droppable_blocks(spec: models.ResNetSpec) -> tuple[str, ...]:
  """Names of the blocks with an identity shortcut (the removable ones), in order."""
  if not isinstance(spec, models.ResNetSpec):
    raise ValueError(f'droppable_blocks needs a ResNetSpec, got {type(spec).__name__}')
  return tuple(name for name, w_in, _, w_out, stride in spec.blocks()
               if not models.block_has_shortcut_conv(w_in, w_out, stride))


def drop_blocks_spec(spec: models.ResNetSpec, drop: Iterable[str]
                     ) -> tuple[models.ResNetSpec, dict[str, str]]:
  """The spec without the blocks `drop`, and the renaming old name -> new name of the kept ones.

  Args:
    spec: a ResNetSpec.
    drop: names of identity-shortcut blocks to delete (see `droppable_blocks`).

  Returns:
    (new_spec, renames): renames maps every kept block's old name to its name
    in new_spec.

  Raises:
    ValueError: a name is unknown or has a projection shortcut, or nothing would be left.
  """
  drop = set(drop)
  names = [row[0] for row in spec.blocks()] if isinstance(spec, models.ResNetSpec) else []
  unknown = sorted(drop - set(names))
  if not isinstance(spec, models.ResNetSpec) or unknown:
    raise ValueError(f'drop_blocks: unknown blocks {unknown} (spec has {names})')
  not_identity = sorted(drop - set(droppable_blocks(spec)))
  if not_identity:
    raise ValueError(f'drop_blocks: blocks {not_identity} have a projection shortcut and cannot '
                     'be removed (only identity-shortcut blocks can)')
  widths, strides, inner, kept = [], [], [], []
  for s, (width, stride, block_widths) in enumerate(
      zip(spec.stage_widths, spec.stage_strides, spec.inner_widths)):
    stage_kept = [(f'stage{s + 1}_block{b}', m) for b, m in enumerate(block_widths)
                  if f'stage{s + 1}_block{b}' not in drop]
    if stage_kept:
      widths.append(width)
      strides.append(stride)
      inner.append(tuple(m for _, m in stage_kept))
      kept.extend(name for name, _ in stage_kept)
  if not widths:
    raise ValueError('drop_blocks: removing every block leaves no stage; keep at least one')
  new_spec = dataclasses.replace(spec, stage_widths=tuple(widths), stage_strides=tuple(strides),
                                 inner_widths=tuple(inner))
  renames = dict(zip(kept, (row[0] for row in new_spec.blocks())))
  return new_spec, renames


def rename_blocks(tree: dict, renames: dict[str, str], all_blocks: Iterable[str]) -> dict:
  """`tree` (params, batch_stats, gates...) with block entries renamed; dropped blocks removed."""
  all_blocks = set(all_blocks)
  out = {}
  for name, value in tree.items():
    if name in all_blocks:
      if name in renames:
        out[renames[name]] = value
    else:
      out[name] = value
  return out


def drop_blocks(spec: models.ResNetSpec, params: Params, batch_stats: BatchStats,
                drop: Iterable[str]) -> tuple[models.ResNetSpec, Params, BatchStats]:
  """Deletes identity-shortcut blocks: `(new_spec, new_params, new_batch_stats)`.

  The new model computes exactly what the old one computes with those blocks'
  residual branches multiplied by 0 (module docstring).

  Args:
    spec: a ResNetSpec.
    params: its params (plain nested dict).
    batch_stats: its batch_stats ({} without running statistics).
    drop: names of identity-shortcut blocks to delete.

  Example:
    >>> from fedjax_prune import models
    >>> spec = models.resnet20(width_multiplier=0.25)
    >>> new_spec, renames = drop_blocks_spec(spec, ['stage1_block1'])
    >>> new_spec.inner_widths[0], renames['stage1_block2']
    ((4, 4), 'stage1_block1')
  """
  new_spec, renames = drop_blocks_spec(spec, drop)
  names = [row[0] for row in spec.blocks()]
  return (new_spec, rename_blocks(params, renames, names),
          rename_blocks(batch_stats, renames, names))
