"""FedRolex: rolling width submodels (Alam et al., NeurIPS 2022).

In round t a width-r client keeps channels {(t + j) mod C : j < ceil(r C)} of
every hidden layer (`channel_keep(C, r, offset=t)`). Shared implementation in
`_width_submodels`.
"""
from fedjax_prune.pruning._width_submodels import channel_keep, fedrolex, width_masks

__all__ = ["channel_keep", "fedrolex", "width_masks"]
