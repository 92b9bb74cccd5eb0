"""Method experiment code: `config.method` -> module with `validate(config)` and `build(config, env) -> runtime.Run`
(and, where its runs can be extended to more rounds, `extendable(config) -> None | reason`: `train.check_extension`).

A plain dict (no global registration): add a line here when a method lands.
"""
from experiments.methods import asp
from experiments.methods import fedavg
from experiments.methods import cavp
from experiments.methods import fedtiny
from experiments.methods import hetero
from experiments.methods import sparse

DRIVERS = {
    "fedavg": fedavg,   # the FedAvg family (config.algorithm.name picks FedAvg/M/Adam/Yogi/Prox)
    "cavp": cavp,       # complexity-aware variational unit/layer pruning (arXiv 2411.09127)
    "asp": asp,          # automatic structured pruning (arXiv 2411.01759): prune filters, rebuild
    "l1_filter": asp,    # fixed-ratio L1 filter pruning (Li et al. 2017) through the same surgery
    "fiarse": hetero,    # FIARSE (config.hetero: capacities, fiarse_grad, layerwise, ...)
    "heterofl": hetero,  # HeteroFL: static width-prefix submodels
    "fedrolex": hetero,  # FedRolex: rolling width window
    "scalefl": hetero,   # ScaleFL: width + depth with early exits, self-distillation
    "fedtiny": fedtiny,  # FedTiny: adaptive BN selection + progressive prune-and-grow
    "sparse": sparse,    # sparse-FL baselines (config.sparse.method: feddst, prunefl, lotteryfl, snip, synflow, dense)
}
