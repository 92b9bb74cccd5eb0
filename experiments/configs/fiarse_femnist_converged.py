"""FIARSE vs HeteroFL, FedRolex and dense FedAvg on real FEMNIST with the LEAF CNN (second dataset).

Command (resumable; re-run it to continue, finished runs are skipped):
  python -m experiments.sweep --config experiments/configs/fiarse_femnist_converged.py \
      --workdir workdir/fiarse_femnist_converged
  (the 1 ... 1/256 size sweep every 50 rounds, for curves: `...converged.py:sizes`)

Data: the three LEAF 5 % samples in ../shared/data/femnist merged by writer (300 writers with
train data; natural by-writer split, each writer's own test samples are its local test set,
the global test set their union; writers with test data only are left out of Local/Model).
Model: the LEAF CNN (conv5x5 32 -> pool -> conv5x5 64 -> pool -> dense 2048 -> 62; 6.6 M
parameters, no normalisation). Width submodels keep ceil(r C) channels of both convs and of the
dense layer; the dense layer's flattened 7x7x64 input keeps the kept conv channels at every
position (`heterofl.width_masks(flatten_keys=...)`); the image input and the 62 classes are never
sliced; the Scaler multiplies the classifier input by 1/r in training and evaluation alike.
Training: the REPRODUCE.md FEMNIST anchor (10 clients/round, 1 local epoch, batch 32, SGD 0.05;
an independent FedAvg reached 0.73 at 100 and 0.80 at 200 rounds on one LEAF source), 600
rounds, server lr 1, no augmentation, capacities {1, 1/4, 1/16, 1/64} interleaved over the
writers. 600, not 200: dense FedAvg in this very setting (the three sources merged, LEAF CNN,
10 clients/round, 1 epoch, B 32, SGD 0.05: robust_femnist.py's dense cell, seed 0) reached
0.753 @ 200, 0.814 @ 300, 0.827 @ 400, 0.839 @ 500, 0.844 @ 600 (docs/results/robust.md), so
200 rounds is far from converged (REPRODUCE.md §1) and 600 is where the last 20 % gains < 1
point. Clients run sharded over the two cores (one CPU device per core). Cost (quiet 2-core
Intel Xeon, 2026-12-07, 6-round runs, rounds 2-6): FIARSE 3.9-4.1 s a round sharded (4.1-4.4
unsharded), HeteroFL 1.8-1.9 s (2.2-2.6 unsharded; the same accuracies either way), i.e. ~40 /
~19 minutes a run, the 15 runs ~7 h.
Evaluation (§4.9) every 20 rounds with batch 256 (no BN: the batch size does not change a
prediction; the CIFAR setting's 20 is for its static BN), each level's local accuracies from its
global pass (`LevelTest.client_ids`), plus the 1 ... 1/256 size sweep at the end; FedRolex also
on the last round's window (`last_round_*`).

Variants (per seed 0, 1, 2): dense (method=heterofl, capacities (1,) = FedAvg with FIARSE's
unweighted average), fiarse_masked, fiarse_tcb, heterofl, fedrolex. ScaleFL is not run: its
depth levels need a model with stages and early exits (the ResNets), which the LEAF CNN is not.
Run the dense rows first and check convergence (REPRODUCE.md) before reading the others.
"""
from experiments.configs import fedavg_femnist, fiarse_cifar10, fiarse_cifar10_converged

# The CIFAR sweep's variants but ScaleFL (its depth levels need a ResNet's stages and exits).
VARIANTS = {name: fields for name, fields in fiarse_cifar10_converged.VARIANTS.items()
            if name != "scalefl"}


def get_config(arg: str | None = None):
  """arg: '' (default) or 'sizes' (the 1 ... 1/256 size sweep every 50 rounds, not only at the end)."""
  if arg not in (None, "", "sizes"):
    raise ValueError(f"config arg must be '' or 'sizes', got {arg!r}")
  c = fiarse_cifar10.base_config("fiarse")
  femnist = fedavg_femnist.get_config()
  c.data = femnist.data
  c.model.name = "leaf_femnist_cnn"
  c.model.norm = "none"
  c.client.learning_rate = 0.05
  c.client.batch_size = 32
  c.client.num_epochs = 1
  c.client.num_steps = 0
  c.hetero.repartition = ""
  c.hetero.augment = False
  c.hetero.capacities = fiarse_cifar10.FOUR_LEVELS
  c.hetero.fedrolex_eval_also = ("last_round",)
  c.hetero.sweep = fiarse_cifar10.SWEEP
  c.hetero.sweep_every = 50 if arg == "sizes" else 0
  c.rounds = 600  # dense FedAvg in this setting converges by ~600 (see the docstring)
  c.clients_per_round = 10
  c.eval_every = 20
  c.eval_batch_size = 256  # no BN (FIARSE's 20 is for static BN); one level 5.1 -> 1.1 s
  c.checkpoint_every = 20
  c.shard_clients = True  # 1.3x a HeteroFL round, 1.07x a FIARSE round on 2 cores
  c.strategy = "sequential+tapgrad+sharded"
  c.progress = False
  return c


def sweep(add):
  for variant in VARIANTS.values():  # dense first: its convergence is checked before the rest
    for seed in (0, 1, 2):
      add(**{"seeds.init": seed, "seeds.training": seed, "seeds.sampling": seed, **variant})
