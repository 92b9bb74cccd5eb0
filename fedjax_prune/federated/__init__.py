"""The federated engine: algorithms as pure functions, one compiled round over a client axis."""
from fedjax_prune.federated import _keys as keys  # jax.random's split/fold_in/uniform, fused on CPU
from fedjax_prune.federated._aggregate import (CountedSum, counted_contribution, finish_counted_mean,
                                               finish_weighted_mean, weighted_contribution)
from fedjax_prune.federated._engine import (CLIENT_AXIS, Chunked, ClientInfo, ClientOutput, Cohort,
                                            Execution, FedAlgorithm, Sequential, Vmap, client_mesh,
                                            default_execution, make_cohort, make_round,
                                            round_compiler_options, round_key, run_clients,
                                            split_cpu_into_devices, split_round_key, usable_cpu_cores)
from fedjax_prune.federated._evaluate import EvalSums, make_evaluate, make_evaluate_clients
from fedjax_prune.federated._fedavg import (FedAvgSums, ServerState, dense_masks, fedadam, fedavg,
                                            fedavgm, fedprox, fedyogi)
from fedjax_prune.federated._local import (LocalMetrics, LocalSchedule, LocalState, batch_indices,
                                           count_correct, epoch_permutations, example_permutation,
                                           loop_real_steps,
                                           make_local_train, masked_batch_loss, num_real_steps,
                                           plan_step_batches, proximal_penalty, round_train_metrics,
                                           run_schedule_steps, softmax_cross_entropy,
                                           static_step_index, step_batch, StepBatches,
                                           waste_free_unroll)
from fedjax_prune.federated._method import ApplyFn, Method, MethodState, ModelFns, no_log
from fedjax_prune.federated._lowrank import (FactoredKernel, LowRankDense, LowRankSum,
                                              worthwhile_lowrank_layers)
from fedjax_prune.federated._strategy import (Strategy, candidate_strategies, select_strategy)
