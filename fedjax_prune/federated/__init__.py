"""The federated engine: algorithms as pure functions, one compiled round over a client axis."""
from fedjax_prune.federated import _keys as keys  # jax.random's split/fold_in/uniform, fused on CPU
from fedjax_prune.federated._aggregate import (CountedSum, counted_contribution, finish_counted_mean,
                                               finish_weighted_mean, weighted_contribution)
from fedjax_prune.federated._engine import (CLIENT_AXIS, Chunked, ClientInfo, ClientOutput,
                                            ClientUpdateFn, Cohort, Execution, FedAlgorithm, InitFn,
                                            Sequential, ServerUpdateFn, Vmap, client_mesh,
                                            default_execution, make_cohort, make_round,
                                            round_compiler_options, round_key, run_clients,
                                            split_cpu_into_devices, split_round_key, usable_cpu_cores)
from fedjax_prune.federated._evaluate import EvalSums, make_evaluate, make_evaluate_clients
from fedjax_prune.federated._fedavg import (FedAvgSums, ServerState, dense_masks, fedadam, fedavg,
                                            fedavgm, fedprox, fedyogi)
from fedjax_prune.federated._local import (LocalMetrics, LocalSchedule, LocalState, count_correct,
                                           example_permutation, make_local_train, proximal_penalty,
                                           round_train_metrics, softmax_cross_entropy,
                                           waste_free_unroll)
from fedjax_prune.federated._method import (ApplyFn, Method, MethodState, ModelFns, host_metrics,
                                             no_log, run_rounds)
from fedjax_prune.federated._lowrank import (FactoredKernel, LowRankDense, LowRankSum,
                                              worthwhile_lowrank_layers)
from fedjax_prune.federated._strategy import (Strategy, candidate_strategies, select_strategy)

__all__ = [
    "keys",
    # aggregation
    "CountedSum",
    "counted_contribution",
    "finish_counted_mean",
    "finish_weighted_mean",
    "weighted_contribution",
    # the engine
    "CLIENT_AXIS",
    "Chunked",
    "ClientInfo",
    "ClientOutput",
    "ClientUpdateFn",
    "Cohort",
    "Execution",
    "FedAlgorithm",
    "InitFn",
    "Sequential",
    "ServerUpdateFn",
    "Vmap",
    "client_mesh",
    "default_execution",
    "make_cohort",
    "make_round",
    "round_compiler_options",
    "round_key",
    "run_clients",
    "split_cpu_into_devices",
    "split_round_key",
    "usable_cpu_cores",
    # evaluation
    "EvalSums",
    "make_evaluate",
    "make_evaluate_clients",
    # FedAvg family
    "FedAvgSums",
    "ServerState",
    "dense_masks",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
    # local training
    "LocalMetrics",
    "LocalSchedule",
    "LocalState",
    "count_correct",
    "example_permutation",
    "make_local_train",
    "proximal_penalty",
    "round_train_metrics",
    "softmax_cross_entropy",
    "waste_free_unroll",
    # methods end to end
    "ApplyFn",
    "Method",
    "MethodState",
    "ModelFns",
    "host_metrics",
    "no_log",
    "run_rounds",
    # low-rank client updates
    "FactoredKernel",
    "LowRankDense",
    "LowRankSum",
    "worthwhile_lowrank_layers",
    # client-execution strategy selection
    "Strategy",
    "candidate_strategies",
    "select_strategy",
]
