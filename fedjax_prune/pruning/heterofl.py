"""HeteroFL: static width-prefix submodels with partial averaging (Diao et al., ICLR 2021).

The implementation is shared with FedRolex and ScaleFL in `_width_submodels`.
"""
from fedjax_prune.pruning._width_submodels import (channel_keep, heterofl, keep_count, sqrt_widths,
                                                   width_masks)

__all__ = ["channel_keep", "heterofl", "keep_count", "sqrt_widths", "width_masks"]
