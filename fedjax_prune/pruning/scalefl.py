"""ScaleFL: width + depth submodels with early exits and self-distillation (Ilhan et al., CVPR 2023).

Use with `models.make_early_exit_apply` / `models.build_early_exit`. The level
rule (`scalefl_levels`), the distillation loss form and weights are inferred
(METHODS.md §5) and exposed as options. Shared implementation in `_width_submodels`.
"""
from fedjax_prune.pruning._width_submodels import (depth_masks, leaf_stages, scalefl, scalefl_levels,
                                                   self_distillation_loss, stage_param_fractions)

__all__ = ["depth_masks", "leaf_stages", "scalefl", "scalefl_levels", "self_distillation_loss",
           "stage_param_fractions"]
