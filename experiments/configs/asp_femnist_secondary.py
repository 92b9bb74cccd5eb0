"""ASP's secondary cells on real FEMNIST (issue 23): the k sweep, and the ResNet- and
Inception-style models, one seed each (REPRODUCE.md §5: the 3 seeds go to the headline
comparison, `asp_femnist_converged.py`).

Command (resumable; re-run it to continue, finished runs are skipped):
  python -m experiments.sweep --config experiments/configs/asp_femnist_secondary.py \
      --workdir workdir/asp_femnist_secondary

Every cell uses the reduced setting of `asp_femnist_converged.py` (600 rounds, 5 local epochs,
batch 32, Adam 1e-3, glorot_uniform kernels, seed 0 for init, sampling and training, so the
same starting weights and data order as that sweep's seed-0 runs):
  k sweep    FEMNIST CNN, faithful ASP (both tails, re-init), k in 1.5, 1.8, 2.0, 2.5 at 20
             clients/round; k = 2.2 is `asp_femnist_converged`'s asp_reinit run and dense its
             dense run. Smaller k keeps a narrower band around the mean L1, so prunes more.
  inherit k  the inheritance variant (lower tail, weights kept) at k = 1.0 and 1.5: at k = 2.2
             it accepted one prune (1 filter) and its search ended after 3 idle rounds, so
             the lower tail needs a smaller k to prune at all.
  resnet     the paper's ResNet-style [16, 32, 64] (BN), 10 clients/round as the paper,
             k = 2.5, MAX_PRUNED_ROUND 100: dense (max_pruned_round = 0) and ASP.
  inception  the paper's Inception-style model, 10 clients/round, k = 2.5,
             MAX_PRUNED_ROUND 100: dense and ASP (~4x the CNN's cost per client step).
  scratch    the found architectures trained from the start as dense FedAvg
             (asp.widths, max_pruned_round = 0), 600 rounds: [14, 25] (what faithful ASP
             found at seed 0) and [17, 43] (the official notebook's). They separate what the
             smaller capacity costs from what the search costs (ASP's final network starts
             from scratch at round ~30 and then trains ~570 rounds).
Cost on a 2-core CPU: the k cells and the scratch cells ~10-25 min each (a dense CNN round
~2.4 s when quiet, a pruned one less); the ResNet and Inception cells are measured in
docs/results/asp.md.
"""
from experiments.configs import asp_femnist_converged

SEED0 = {"seeds.init": 0, "seeds.training": 0, "seeds.sampling": 0}
K_SWEEP = (1.5, 1.8, 2.0, 2.5)
INHERIT_K = (1.0, 1.5)
FOUND_WIDTHS = ((14, 25), (17, 43))  # ASP's seed-0 architecture at k = 2.2; the official one
DEEP_MODELS = {
    "resnet": {"model.name": "asp_resnet", "model.norm": "batch_running"},
    "inception": {"model.name": "asp_inception"},
}


def get_config(arg: str | None = None):
  return asp_femnist_converged.get_config(arg)


def sweep(add):
  # Run order = what a 2-core session most needs first: the scratch cells separate capacity
  # from search cost (the open question of the headline verdict), then the k sweep's ends.
  for widths in FOUND_WIDTHS:  # dense FedAvg of the found architecture from round 0
    add(**{"asp.widths": widths, "asp.max_pruned_round": 0, **SEED0})
  for k in sorted(K_SWEEP, key=lambda k: abs(k - 2.0), reverse=True):  # 1.5, 2.5, 1.8, 2.0
    add(**{"asp.k": k, **SEED0})
  for k in INHERIT_K:
    add(**{"asp.k": k, "asp.reinit_on_prune": False, "asp.tails": "lower", **SEED0})
  for fields in DEEP_MODELS.values():
    deep = {**fields, "clients_per_round": 10, "asp.k": 2.5, **SEED0}
    add(**{**deep, "asp.max_pruned_round": 0})  # dense: the search ends before it starts
    add(**{**deep, "asp.max_pruned_round": 100})
