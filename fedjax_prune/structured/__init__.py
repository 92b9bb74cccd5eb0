"""Structured pruning surgery: channel groups, `shrink`, and keep masks.

Shape-changing pruning happens between phases, on the host: `shrink` returns a
smaller spec plus sliced params / BatchNorm statistics / optimizer state; the
model is rebuilt from the spec (`models.make_apply`) and the round re-jitted
once. `keep_masks` gives the equivalent masks on the dense model (for the
surgery contract and for accounting); `group_l1` the per-filter L1 scores;
`channel_activity` which conv channels still fire (dead channels stop an L1 search).
Text models (LSTM units, attention heads, FFN units, transformer blocks): `text_shrink`,
`text_keep_masks`, `text_groups`, `text_group_l1` (`_text_shrink`); the generic `shrink`,
`keep_masks`, `groups`, `keep_indices`, `slice_like` and `group_l1` dispatch to them for
text specs (whole blocks only through `text_shrink(..., drop_blocks=...)`).
"""
from fedjax_prune.structured._activity import activity_summary, channel_activity
from fedjax_prune.structured._drop_blocks import droppable_blocks, drop_blocks, drop_blocks_spec
from fedjax_prune.structured._graph import Group
from fedjax_prune.structured._shrink import (Keep, Shrunk, group_l1, groups, keep_indices,
                                             keep_masks, shrink, slice_like)
from fedjax_prune.structured._spec import spec_from_json, spec_to_json
from fedjax_prune.structured._text_shrink import (text_group_l1, text_groups, text_keep_indices,
                                                  text_keep_masks, text_shrink, text_slice_like)

__all__ = ['Group', 'Keep', 'Shrunk', 'activity_summary', 'channel_activity', 'drop_blocks', 'drop_blocks_spec', 'droppable_blocks',
           'group_l1', 'groups', 'keep_indices', 'keep_masks', 'shrink', 'slice_like',
           'spec_from_json', 'spec_to_json',
           'text_group_l1', 'text_groups', 'text_keep_indices', 'text_keep_masks', 'text_shrink',
           'text_slice_like']
