"""Complexity-aware variational unit/layer pruning on CIFAR-10 (arXiv 2411.09127).

`get_config(arg)`, arg = comma-separated tokens (any order, each optional):
  model:      'resnet20' (default) | 'resnet56' | 'cpu' (ResNet-20 at width
              x0.25 = 4/8/16 channels: the CPU-sized run of docs/results/cavp.md)
  mode:       'centralised' (default; the paper's setting, all data in one
              client) | 'federated' (our extension)
  structures: 'both' (default; the paper's combined pruning) | 'units' |
              'layers' (the ablations)

Data: the real CIFAR-10 subset in `../shared/data/cifar10/` (PFLlib
Dirichlet(0.3) partition, clients 0-19 of 100: 8,265 train / 2,767 test
images); pass another PFLlib folder with `--config.data.data_dir=...`.

Commands (from the repository root):
  python -m experiments.main --config experiments/configs/cavp_cifar10.py:resnet20,centralised,both \
      --workdir workdir/cavp_r20
  python -m experiments.main --config experiments/configs/cavp_cifar10.py:cpu,federated,units \
      --workdir workdir/cavp_cpu_fed_units
  # after a kill: the same command plus --resume (a checkpoint every 2 rounds for 'cpu',
  # every 10 otherwise; --config.checkpoint_every=N to change, 0 = none)

Expected runtime / result:
  * 'resnet20' / 'resnet56' full settings (160 epochs-worth of rounds, SGD
    0.1 momentum 0.9, batch 128): not run here; on one H100-class GPU roughly
    10 / 30 minutes on this 8k-image subset (estimate, unmeasured). The paper
    reports (in its abstract; no numbers could be read) that combined pruning beats
    unit-only and layer-only pruning at matched accuracy.
  * 'cpu' (10 rounds x 40 steps of batch 32, rebuild every 5 rounds): 14-22
    minutes per run measured on a 2-core CPU shared with ~5 other jobs (load
    10-14; far less on an idle machine). Centralised: test accuracy ~0.30 with
    ~90 % fewer parameters and FLOPs at gamma=1 (0.35 without pruning,
    gamma=0); measured numbers and findings in docs/results/cavp.md.
"""
import json
import os
import statistics

import ml_collections

from experiments import curves

DATA_DIR = "../shared/data/cifar10/fedlore_pfllib_dir0.3_100clients"
# The converged sweeps' archives (experiments/converged_sweeps.sh --archive), from the repo root.
RUNS_ARCHIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir,
                            "docs", "results", "runs")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  model, mode, structures = "resnet20", "centralised", "both"
  for t in tokens:
    if t in ("resnet20", "resnet56", "cpu"):
      model = t
    elif t in ("centralised", "federated"):
      mode = t
    elif t in ("both", "units", "layers"):
      structures = t
    else:
      raise ValueError(f"cavp_cifar10 config: unknown token {t!r}; allowed resnet20, resnet56, "
                       "cpu, centralised, federated, both, units, layers")
  cpu = model == "cpu"
  c = ml_collections.ConfigDict()
  c.method = "cavp"
  c.seeds = ml_collections.ConfigDict(dict(init=0, sampling=1, training=2, data=3))
  c.data = ml_collections.ConfigDict(dict(name="cifar10_pfllib", data_dir=DATA_DIR))
  c.model = ml_collections.ConfigDict(dict(
      name="resnet20" if cpu else model, hidden=(), norm="batch_running",
      width_multiplier=0.25 if cpu else 1.0,
      compute_dtype="float32"))  # or "bfloat16": bf16 GEMMs, float32 params
  # Unused by cavp (build.validate checks every method's shared fields).
  c.algorithm = ml_collections.ConfigDict(dict(
      name="fedavg", server_learning_rate=1.0, server_momentum=0.0, prox_mu=0.0))
  c.client = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=0.05 if cpu else 0.1, momentum=0.9,
      batch_size=32 if cpu else 128, num_epochs=1, num_steps=0))
  c.cavp = ml_collections.ConfigDict(dict(
      mode=mode, structures=structures,
      # The three user parameters (cavp.CostWeights): accuracy vs pruning,
      # layer vs unit, FLOPs vs params.
      gamma=1.0, alpha=1.0, beta=0.5,
      # θ by projected SGD (METHODS.md §3.3; issue 26): Adam normalised every coordinate, so
      # the cost weights λ_g barely mattered, and its state restarted every round (each
      # round's first step was lr * sign(g)). The rate is a placeholder until the γ sweep.
      theta_optimizer="sgd", theta_learning_rate=0.1,
      # The weights' learning rate over rounds: 'none' (constant) or 'cosine' (to 0 at the
      # last round; a round's optimizer restarts, so the decay is applied per round).
      weight_lr_decay="none",
      theta_init=0.9,
      unit_estimator="straight_through", layer_estimator="straight_through", per_example=False,
      prune_threshold=0.05, one_epsilon=0.02, final_threshold=0.5, rho=0.0,
      rebuild_every=5 if cpu else 10,
      # Issue 26 options, off here (experiments/methods/cavp.py; the converged configs
      # cavp_cifar10_centralised.py / cavp_femnist_converged.py switch them on):
      persist_theta_optimizer=False,   # keep the θ optimizer's state (Adam) across rounds
      recalibrate_after_rebuild=False,  # BN statistics re-estimated at every rebuild
      recalibration_steps=100,          # forward passes per BN recalibration
      recalibration_augment=False,      # recalibrate on augmented inputs (as trained)
      finetune_steps=0, finetune_learning_rate=0.01,  # fine-tune of the finalised network
      augment=False))                   # random crop + flip of the training batches
  if mode == "centralised":
    c.rounds = 10 if cpu else 160  # full: one epoch over the pooled data per round
    c.clients_per_round = 1
    c.client.num_steps = 40 if cpu else 0
  else:
    c.rounds = 10 if cpu else 400
    c.clients_per_round = 5 if cpu else 10
    c.client.num_steps = 8 if cpu else 0  # cpu: 5 x 8 = 40 steps a round, as centralised
  c.eval_every = 10  # evaluation uses the deterministic gates
  c.eval_batch_size = 500
  c.strategy = "sequential+lax"
  c.strategy_cache = ""
  c.shard_clients = False
  c.cpu_devices = 0  # unused while shard_clients is False (see fedavg_synthetic.py)
  c.progress = False
  # Run-level fields (experiments/train.py); defined here so that command-line overrides
  # such as --config.checkpoint_every=5 work on the locked config. Unlike the fedtiny/fiarse
  # paper configs (0), CAVP checkpoints by default: a CPU run takes 14-22 minutes and a full
  # run hundreds of rounds, and a checkpoint (weights, theta, alive, lambda of the current,
  # possibly rebuilt, architecture) is small next to a round. Resume with --resume.
  c.checkpoint_every = 2 if cpu else 10  # rounds between checkpoints (0 = none)
  c.checkpoint_keep = 3    # most recent checkpoints kept
  c.tensorboard = False    # also log TensorBoard scalars (needs tensorboardX)
  return c


def chosen_gamma(archive: str, gammas: tuple[float, ...], structures: tuple[str, ...],
                 within: float = 0.03) -> float | None:
  """The headline γ of a converged CAVP sweep, by the rule fixed before its gated runs.

  The rule (2026-12-07, session 23; the configs' docstrings): the largest γ in `gammas` whose
  seed-0 test accuracy, averaged over `structures`, is within `within` (3 points) of the
  dense seed-0 run's; if no γ qualifies, the smallest. The mean over the structures, not the
  combined gates alone, so that the choice does not favour the claim under test.

  Reads the finished runs under `archive` (a sweep's `--archive` folder: one folder per run
  with `config.json` and `summary.json`). A run is seed 0 when its init, sampling and
  training seeds are 0; it is the dense cell when θ is frozen (`cavp.theta_learning_rate`
  0) at γ 0. Returns None until the dense run and every (γ, structure) run of seed 0 have
  finished, so that a sweep never picks γ from a partial grid.

  Raises:
    ValueError: two finished seed-0 runs are the same cell (the archive mixes configs).
  """
  accuracy: dict[tuple, float] = {}
  for run, config in curves.archived_runs(archive, needs=("config.json", "summary.json")):
    name = os.path.basename(run)
    with open(os.path.join(run, "summary.json")) as f:
      summary = json.load(f)
    if any(config["seeds"][k] != 0 for k in ("init", "sampling", "training")):
      continue
    cavp = config["cavp"]
    dense = cavp["gamma"] == 0 and cavp["theta_learning_rate"] == 0
    cell = ("dense",) if dense else (float(cavp["gamma"]), cavp["structures"])
    if cell in accuracy:
      raise ValueError(f"{archive!r}: two finished seed-0 runs of the cell {cell} (run "
                       f"{name!r} and another): the archive mixes configs")
    accuracy[cell] = float(summary["test_accuracy"])
  gated = [(float(g), s) for g in gammas for s in structures]
  if ("dense",) not in accuracy or any(cell not in accuracy for cell in gated):
    return None
  # 1e-9: "within 3 points" includes 3 points, which float means can overshoot by an ulp
  qualifying = [g for g in gammas
                if accuracy[("dense",)] - statistics.fmean(
                    accuracy[(float(g), s)] for s in structures) <= within + 1e-9]
  return max(qualifying) if qualifying else min(gammas)


def sweep(add):
  for structures in ("both", "units", "layers"):
    for gamma in (1.0, 2.0, 4.0):
      add(**{"cavp.structures": structures, "cavp.gamma": gamma})
