"""CAVP, centralised and converged: CIFAR ResNet-20 (x0.5) on the real CIFAR-10 subset (issue 26).

The paper's setting (centralised training, METHODS.md §3) in the driver's 'centralised' mode:
the 20 clients' training images pooled into ONE client (8,265 images of
`../shared/data/cifar10/fedlore_pfllib_dir0.3_100clients`; test: the 2,767 pooled test
images), one round = one epoch over them (65 steps of batch 128), random crop (pad 4) +
horizontal flip, SGD lr 0.05 momentum 0.9 on the weights, projected SGD on θ (lr 0.1),
BatchNorm statistics recalibrated on 1,024 training inputs, augmented as in training (50
passes of 256, `cavp.recalibration_augment`), at every rebuild (every 5 epochs) and for the
finalised network, which every cell gets (dense included). The weights' learning rate decays along a cosine from 0.05 to 0 over the EPOCHS
(`cavp.weight_lr_decay='cosine'`; θ's rate stays constant); no weight decay; no fine-tune
of the finalised network (`cavp.finetune_steps=0`). "Converged" is REPRODUCE.md's criterion
(< 1 point over the last 20 % of epochs), checked on the dense seed-0 run first (the sweep
runs it first).

Why the decay and no fine-tune (2026-12-07, session 21; docs/results/cavp.md): with a
constant rate the dense seed-0 run (archived in
docs/results/runs/cavp_cifar10_dense_constant_lr/seed0/) ended its 60 epochs noisy and still
rising (0.695 at epoch 48, 0.727 at 60; ±3 points between evaluations) and a one-epoch
fine-tune at lr 0.01 alone added 3.5 points (0.7615): the constant rate, not the budget,
limited it. The paper's schedule could not be read (METHODS.md §3); a decay is the standard
CIFAR ResNet practice and is chosen once, on the dense run (REPRODUCE.md §2). With the
cosine, the dense run reached 0.765 at epoch 60 (0.755 at 48), and the same fine-tune then
cost 2.0 points (it restarts at lr 0.01 after the anneal reached 0; archived in
docs/results/runs/cavp_cifar10_dense_cosine_finetune/seed0/), so it is off. Recalibrating
that run's final network on the raw training images cost 1.7 points (0.765 -> 0.748); on
the same images augmented as in training (resumed from its epoch-55 checkpoint: epoch 60
again 0.7654, bit-exact) 0.3 (0.762), so the recalibration is augmented. Budget check: the same
schedule over 90 epochs ended at 0.769 (+0.4; its last 20 % gained 0.5), so 60 epochs with
the cosine is converged (archived in docs/results/runs/cavp_cifar10_dense_cosine_90epochs/).

Model: `models.resnet20` at width x0.5 (8/16/32 channels): 68,786 parameters, 20,673,212
FLOPs (`accounting`); 168 unit gates (block inner channels), 7 layer gates (identity blocks).

Grid (`sweep`), every cell from the same init weights per seed:
  dense   γ = 0, θ frozen at 1 (`theta_init=1`, `theta_learning_rate=0`): every gate stays
          on, i.e. plain ResNet-20 training through the same driver (same init, data order,
          augmentation, recalibration and records)
  units / layers / both   unit-only, layer-only and combined gates at γ in GAMMAS
Seeds: the headline cells (dense and the three structures at the headline γ) get seeds 0, 1, 2;
the other γ one seed (REPRODUCE.md §5). EXTRA_GAMMAS (0.1, 0.25; seed 0, the three
structures) extend the grid below 0.5 after the fact (session 25, said in
docs/results/cavp.md); the rule reads GAMMAS only, and these 6 runs come last. The headline γ (`headline_gamma()`) is None until
every seed-0 run is archived: until then seeds 1 and 2 run dense only, so an unattended sweep
cannot spend their six gated runs on an unchosen γ; once they are, `cavp_cifar10.chosen_gamma`
applies the rule below to the archive (docs/results/runs/cavp_cifar10_centralised) and
re-running the sweep adds the six runs (`experiments/converged_sweeps.sh` re-runs a sweep
whose grid grew). CHOSEN_GAMMA = a value overrides the rule (say so in the docs).
The rule, fixed (2026-12-07, session 23) before any gated run of this sweep had
finished, so that the seed-0 results cannot steer it: the headline γ is the largest γ in GAMMAS
at which the mean over the three structures (units, layers, both) of the seed-0 test
accuracy after the final recalibration is within 3 points of the dense seed-0 run's (the
regime the paper reports: pruning at a small accuracy cost); if no γ qualifies, the smallest.
The mean over structures, not 'both' alone, so that the choice does not favour the combined
gates, whose advantage is the claim under test.
Every record carries the gate statistics (`units_binary_frac`, `layers_binary_frac`: the
fraction of θ in {0, 1}; `units_alive`, `layers_alive`, `*_theta_mean`), params and FLOPs.

Command (resumable; re-run it to continue, finished runs are skipped):
  python -m experiments.sweep --config experiments/configs/cavp_cifar10_centralised.py \
      --workdir workdir/cavp_cifar10_centralised
One run: python -m experiments.main --config experiments/configs/cavp_cifar10_centralised.py \
      --workdir workdir/cavp_c10_both --config.cavp.structures=both

Cost, measured 2026-12-06 on the 2-core CPU while shared with other jobs (load average 6-7):
a 3-step run of this config ('sequential+tapgrad') took 1.8 s for 3 training steps of batch
128 once compiled (0.6 s a step; 0.4 s in a bare benchmark of the CAVP local step), i.e.
~40 s an epoch of 65 steps at that load, ~40 minutes a 60-epoch run; 'sequential+lax' took
7.5 s a step (XLA's CPU convolution at 8-32 channels). On an unshared machine expect several
times less. Measured 2026-12-07 on a quiet 2-core Intel Xeon (other jobs paused; `--config.rounds=4
--config.eval_every=100 --config.cavp.gamma=1`): 17.3-17.6 s an epoch after the first (27.6 s
with compilation), i.e. ~18-20 minutes a 60-epoch run, ~7 h for the 21. Runs: 13 (seed
0: dense, 3 structures x 4 γ) + 2 x 4 (seeds 1, 2: dense and the 3 structures at
the headline γ) = 21, + 6 EXTRA_GAMMAS runs = 27; 21 until seed 0 is archived.
"""
import os

from experiments.configs import cavp_cifar10

EPOCHS = 60
GAMMAS = (0.5, 1.0, 2.0, 4.0)
# A post-hoc extension below the grid (session 25, after 6 of the 13 seed-0 runs: every
# combined-gate run had lost 11-16 points, unit gates at γ 0.5 7.9): one seed each, for the
# accuracy-vs-FLOPs front nearer dense; not read by the headline rule, run after its 6 runs.
EXTRA_GAMMAS = (0.1, 0.25)
STRUCTURES = ("both", "units", "layers")
# The headline γ (3 seeds). None: `cavp_cifar10.chosen_gamma` applies the rule of the docstring
# to the archived seed-0 runs; set a value only to override the rule (and say so in the docs).
CHOSEN_GAMMA = None
ARCHIVE = os.path.join(cavp_cifar10.RUNS_ARCHIVE, "cavp_cifar10_centralised")
DENSE = {"cavp.gamma": 0.0, "cavp.theta_init": 1.0, "cavp.theta_learning_rate": 0.0}


def get_config(arg: str | None = None):
  del arg
  c = cavp_cifar10.get_config("resnet20,centralised,both")
  c.model.width_multiplier = 0.5
  c.client.learning_rate = 0.05
  c.client.momentum = 0.9
  c.client.batch_size = 128
  c.client.num_epochs = 1
  c.client.num_steps = 0
  c.rounds = EPOCHS
  c.eval_every = 4  # a test pass costs ~1/9 of an epoch; the gate statistics are in every record
  c.checkpoint_every = 5
  c.cavp.weight_lr_decay = "cosine"  # see the docstring: the constant rate did not converge
  c.cavp.theta_optimizer = "sgd"
  c.cavp.theta_learning_rate = 0.1
  c.cavp.rebuild_every = 5
  c.cavp.recalibrate_after_rebuild = True
  c.cavp.recalibration_augment = True  # raw inputs cost the dense run 1.7 points, these 0.3
  c.cavp.recalibration_steps = 50  # the old statistics keep a weight 0.9 ** 50 = 0.005
  c.cavp.finetune_steps = 0  # after the cosine anneal a fine-tune at lr 0.01 cost 2 points
  c.cavp.finetune_learning_rate = 0.01  # (used only with --config.cavp.finetune_steps > 0)
  c.cavp.augment = True
  # 'tapgrad' convolutions: ~20x faster than 'lax' on CPU at these widths (measured: 0.4 s vs
  # 7.5 s a step of batch 128, loaded 2-core CPU).
  c.strategy = "sequential+tapgrad"
  c.progress = False
  return c


def _seeds(seed):
  return {"seeds.init": seed, "seeds.sampling": seed, "seeds.training": seed}


def headline_gamma() -> float | None:
  """CHOSEN_GAMMA if set, else the rule applied to the archive (None until seed 0 is done)."""
  if CHOSEN_GAMMA is not None:
    return CHOSEN_GAMMA
  return cavp_cifar10.chosen_gamma(ARCHIVE, GAMMAS, STRUCTURES)


def sweep(add):
  chosen = headline_gamma()
  for seed in (0, 1, 2):
    add(**{**_seeds(seed), **DENSE})
    for structures in STRUCTURES:
      for gamma in GAMMAS:
        if seed == 0 or gamma == chosen:
          add(**{**_seeds(seed), "cavp.structures": structures, "cavp.gamma": gamma})
  for structures in STRUCTURES:  # secondary cells, last: after the headline runs
    for gamma in EXTRA_GAMMAS:
      add(**{**_seeds(0), "cavp.structures": structures, "cavp.gamma": gamma})
