"""Pruning methods: one module per method (FedTiny and the sparse-FL baselines, FIARSE, ...)."""
from fedjax_prune.pruning import cavp  # complexity-aware variational unit/layer pruning (arXiv 2411.09127)
from fedjax_prune.pruning import auto_structured  # ASP: automatic structured pruning (arXiv 2411.01759)
from fedjax_prune.pruning import l1_filter  # fixed-ratio L1 filter pruning (Li et al. 2017)
from fedjax_prune.pruning import base  # MaskRule and masked_fedavg, the one server of the sparse methods
from fedjax_prune.pruning.base import MaskRule, masked_fedavg, no_prune
# the submodel-method vocabulary (FIARSE, HeteroFL, FedRolex, ScaleFL)
from fedjax_prune.pruning._hetero import (HeteroMethod, HeteroState, LevelTest, client_capacities,
                                          submodel_method)
from fedjax_prune.pruning import one_shot  # FedAvg family + one-shot global magnitude pruning
from fedjax_prune.pruning import fedtiny  # FedTiny: adaptive BN selection + progressive prune-and-grow (ICDCS 2023)
from fedjax_prune.pruning import feddst  # FedDST: client prune/regrow + mask voting (AAAI 2022)
from fedjax_prune.pruning import prunefl  # PruneFL: one-client initial pruning + adaptive importance (TNNLS 2022)
from fedjax_prune.pruning import lotteryfl  # LotteryFL, global-ticket variant (2020)
from fedjax_prune.pruning import init_pruning  # SNIP and SynFlow masks at initialisation
from fedjax_prune.pruning import fiarse  # FIARSE: importance-aware submodels (NeurIPS 2024)
from fedjax_prune.pruning import heterofl  # HeteroFL: static width-prefix submodels (ICLR 2021)
from fedjax_prune.pruning import fedrolex  # FedRolex: rolling width submodels (NeurIPS 2022)
from fedjax_prune.pruning import scalefl  # ScaleFL: width + depth (early-exit) submodels (CVPR 2023)

__all__ = [
    # the sparse-method vocabulary
    "base",
    "MaskRule",
    "masked_fedavg",
    "no_prune",
    # the submodel-method vocabulary
    "HeteroMethod",
    "HeteroState",
    "LevelTest",
    "client_capacities",
    "submodel_method",
    # one module per method
    "auto_structured",
    "cavp",
    "feddst",
    "fedrolex",
    "fedtiny",
    "fiarse",
    "heterofl",
    "init_pruning",
    "l1_filter",
    "lotteryfl",
    "one_shot",
    "prunefl",
    "scalefl",
]
