"""Speed, kept apart from the engine core: choosing a client-execution strategy by
measurement (and its cache), CPU devices per core and compiler options, and dense
client kernels trained as low-rank factors.

None of it changes results (up to float summation order): `federated.make_round` is
the plain compiled round, and `Strategy.make_round` is that round with the measured
strategy's execution, mesh and compiler options.
"""
from fedjax_prune.performance._cpu import (round_compiler_options, split_cpu_into_devices,
                                           usable_cpu_cores)
from fedjax_prune.performance._lowrank import (FactoredKernel, LowRankDense, LowRankSum,
                                               worthwhile_lowrank_layers)
from fedjax_prune.performance._strategy import Strategy, candidate_strategies, select_strategy

__all__ = [
    # CPU
    "round_compiler_options",
    "split_cpu_into_devices",
    "usable_cpu_cores",
    # low-rank client kernels
    "FactoredKernel",
    "LowRankDense",
    "LowRankSum",
    "worthwhile_lowrank_layers",
    # strategy choice
    "Strategy",
    "candidate_strategies",
    "select_strategy",
]
