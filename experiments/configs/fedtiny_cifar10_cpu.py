"""FedTiny, reduced CPU setting on the real 20-client CIFAR-10 subset.

Command:
  python -m experiments.main --config experiments/configs/fedtiny_cifar10_cpu.py \
      --workdir workdir/fedtiny_cpu --config.sparse.density=0.05

Reduced from the paper setting (fedtiny_cifar10.py): the 20-client PFLlib split in
../shared/data/cifar10 (Dirichlet 0.3, 8,265 train / 2,767 test images), VGG-11 at
1/8 width (conv widths 8..64, 145,554 parameters), ERK layer densities, 20 rounds of
5 clients x 4 local steps of batch 32, SGD lr 0.05, C = 3 candidates, 3 blocks, the
paper's schedule scaled to 20 rounds (ΔT = 1, T_end = 12: 11 adjustment rounds, each block
adjusted 3-4 times); evaluation after the last round.
Expected runtime: 1-3 minutes on a 2-core CPU shared with other jobs (measured
35-180 s of rounds under load 5-20). Expected result (3 seeds, docs/results/fedtiny.md,
measured with the earlier ΔT = 4, T_end = 16 schedule that adjusted each block about once):
test accuracy 0.29-0.34 at density 0.05 and 0.14-0.17 at 0.01 (chance 0.10),
density exactly the target throughout.
"""
from experiments.configs import fedtiny_cifar10


def get_config(arg: str | None = None):
  """arg: model, 'vgg11' (default) or 'resnet18' (ResNet-18 at 1/8 width)."""
  c = fedtiny_cifar10.base_config("vgg11", cpu=True)
  if arg == "resnet18":
    c.model.name = "resnet18"
    c.model.width_multiplier = 1 / 8
  return c


def sweep(add):
  for d in (0.05, 0.01):
    for seed in (0, 1, 2):
      add(**{"sparse.density": d, "seeds.init": seed, "seeds.sampling": seed + 1,
             "seeds.training": seed + 2})
