"""The federated engine: algorithms as pure functions, one compiled round over a client axis."""
from fedjax_prune.federated._aggregate import (CountedSum, counted_contribution, finish_counted_mean,
                                               finish_weighted_mean, weighted_contribution)
from fedjax_prune.federated._engine import (CLIENT_AXIS, Chunked, ClientInfo, ClientOutput, Cohort,
                                            Execution, FedAlgorithm, Sequential, Vmap, client_mesh,
                                            make_cohort, make_round, round_key, run_clients,
                                            split_round_key)
from fedjax_prune.federated._evaluate import EvalSums, make_evaluate, make_evaluate_clients
from fedjax_prune.federated._fedavg import (FedAvgSums, ServerState, dense_masks, fedadam, fedavg,
                                            fedavgm, fedprox, fedyogi)
from fedjax_prune.federated._local import (LocalMetrics, LocalSchedule, LocalState, batch_indices, epoch_permutations,
                                           make_local_train, proximal_penalty, softmax_cross_entropy)
from fedjax_prune.federated._strategy import (Strategy, candidate_strategies, select_strategy)
