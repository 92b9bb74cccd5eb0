"""CAVP, centralised and converged: CIFAR ResNet-20 (x0.5) on the real CIFAR-10 subset (issue 26).

The paper's setting (centralised training, METHODS.md §3) in the driver's 'centralised' mode:
the 20 clients' training images pooled into ONE client (8,265 images of
`../shared/data/cifar10/fedlore_pfllib_dir0.3_100clients`; test: the 2,767 pooled test
images), one round = one epoch over them (65 steps of batch 128), random crop (pad 4) +
horizontal flip, SGD lr 0.05 momentum 0.9 on the weights, projected SGD on θ (lr 0.1),
BatchNorm statistics recalibrated on 1,024 training inputs (50 passes of 256) at every
rebuild (every 5 epochs) and for the finalised network, then 65 fine-tune steps (one epoch,
lr 0.01) of the finalised network, which every cell gets (dense included): EPOCHS + 1 epochs
in all. No learning-rate decay and no weight decay (the driver has neither): "converged"
is REPRODUCE.md's criterion (< 1 point over the last 20 % of epochs), to be checked on the
dense seed-0 run first (the sweep runs it first).

Model: `models.resnet20` at width x0.5 (8/16/32 channels): 68,786 parameters, 20,673,212
FLOPs (`accounting`); 168 unit gates (block inner channels), 7 layer gates (identity blocks).

Grid (`sweep`), every cell from the same init weights per seed:
  dense   γ = 0, θ frozen at 1 (`theta_init=1`, `theta_learning_rate=0`): every gate stays
          on, i.e. plain ResNet-20 training through the same driver (same init, data order,
          augmentation, fine-tune and records)
  units / layers / both   unit-only, layer-only and combined gates at γ in GAMMAS
Seeds: the headline cells (dense and the three structures at CHOSEN_GAMMA) get seeds 0, 1, 2;
the other γ one seed (REPRODUCE.md §5). CHOSEN_GAMMA is a placeholder: set it from the
seed-0 γ sweep before spending the seeds 1 and 2 runs (rerunning the sweep then adds them).
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
CHOSEN_GAMMA) = 21.
"""
from experiments.configs import cavp_cifar10

EPOCHS = 60
GAMMAS = (0.5, 1.0, 2.0, 4.0)
CHOSEN_GAMMA = 1.0  # headline γ for 3 seeds; set from the seed-0 sweep
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
  c.cavp.theta_optimizer = "sgd"
  c.cavp.theta_learning_rate = 0.1
  c.cavp.rebuild_every = 5
  c.cavp.recalibrate_after_rebuild = True
  c.cavp.recalibration_steps = 50  # the old statistics keep a weight 0.9 ** 50 = 0.005
  c.cavp.finetune_steps = 65  # one epoch of batch 128
  c.cavp.finetune_learning_rate = 0.01
  c.cavp.augment = True
  # 'tapgrad' convolutions: ~20x faster than 'lax' on CPU at these widths (measured: 0.4 s vs
  # 7.5 s a step of batch 128, loaded 2-core CPU).
  c.strategy = "sequential+tapgrad"
  c.progress = False
  return c


def _seeds(seed):
  return {"seeds.init": seed, "seeds.sampling": seed, "seeds.training": seed}


def sweep(add):
  for seed in (0, 1, 2):
    add(**{**_seeds(seed), **DENSE})
    for structures in ("both", "units", "layers"):
      for gamma in GAMMAS:
        if seed == 0 or gamma == CHOSEN_GAMMA:
          add(**{**_seeds(seed), "cavp.structures": structures, "cavp.gamma": gamma})
