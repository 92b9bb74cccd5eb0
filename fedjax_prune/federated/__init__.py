"""The federated engine: algorithms as pure functions, one compiled round over a client axis.

Speed machinery (strategy choice by measurement, CPU devices per core, compiler options,
low-rank client kernels) lives in `fedjax_prune.performance`."""
from fedjax_prune.federated import _keys as keys  # jax.random's split/fold_in/uniform, fused on CPU
from fedjax_prune.federated._aggregate import (CountedSum, counted_contribution, finish_counted_mean,
                                               finish_weighted_mean, weighted_contribution)
from fedjax_prune.federated._engine import (CLIENT_AXIS, Chunked, ClientInfo, ClientOutput,
                                            ClientUpdateFn, Cohort, Execution, FedAlgorithm, InitFn,
                                            Sequential, ServerUpdateFn, Vmap, client_mesh,
                                            default_execution, make_cohort, make_round,
                                            round_key, run_clients, split_round_key)
from fedjax_prune.federated._evaluate import EvalSums, make_evaluate, make_evaluate_clients
from fedjax_prune.federated._fedavg import (FedAvgSums, ServerState, dense_masks, fedadam, fedavg,
                                            fedavg_view, fedavgm, fedprox, fedyogi)
from fedjax_prune.federated._robust import (Aggregator, Contribution, MeanSums, Stacked, SumsView,
                                            coordinate_median, krum, mean, norm_bound,
                                            trimmed_mean, weighted_view, with_aggregator)
from fedjax_prune.federated._attacks import (Attack, Trigger, attack_success_rate, backdoor,
                                             choose_attackers, gaussian_noise, label_flip,
                                             no_attack, poison_data, scaled_update, sign_flip,
                                             with_attack)
from fedjax_prune.federated._local import (LocalMetrics, LocalSchedule, LocalState, count_correct,
                                           example_permutation, make_local_train, proximal_penalty,
                                           round_train_metrics, softmax_cross_entropy,
                                           waste_free_unroll)
from fedjax_prune.federated._method import (ApplyFn, Method, MethodState, ModelFns, host_metrics,
                                             no_log, run_rounds)

__all__ = [
    "keys",
    # aggregation
    "CountedSum",
    "counted_contribution",
    "finish_counted_mean",
    "finish_weighted_mean",
    "weighted_contribution",
    # the aggregation hook and robust aggregators
    "Aggregator",
    "Contribution",
    "MeanSums",
    "Stacked",
    "SumsView",
    "coordinate_median",
    "krum",
    "mean",
    "norm_bound",
    "trimmed_mean",
    "weighted_view",
    "with_aggregator",
    # attacks
    "Attack",
    "Trigger",
    "attack_success_rate",
    "backdoor",
    "choose_attackers",
    "gaussian_noise",
    "label_flip",
    "no_attack",
    "poison_data",
    "scaled_update",
    "sign_flip",
    "with_attack",
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
    "round_key",
    "run_clients",
    "split_round_key",
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
    "fedavg_view",
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
]
