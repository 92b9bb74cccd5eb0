"""FIARSE (and the baselines) reduced to run on a CPU in minutes, real CIFAR-10 subset.

Command:
  python -m experiments.main --config experiments/configs/fiarse_cifar10_cpu.py \
      --workdir workdir/fiarse_cpu --config.method=fiarse --config.hetero.fiarse_grad=masked
  (methods: fiarse, heterofl, fedrolex, scalefl; seeds via --config.seeds.*=s)

Data: ../shared/data/cifar10 (20 clients of PFLlib's Dirichlet alpha = 0.3
CIFAR-10 split; 8,265 train / 2,767 test images; each client's own test files
are its local test set, their union the global test set; no re-partition).
Reduced from fiarse_cifar10.py: ResNet-18 at width 1/8 (8/16/32/64 channels, static BN),
5 of 20 clients per round, 10 local SGD steps of batch 20 (lr 0.1), 30 rounds,
capacities {1, 1/4, 1/16, 1/64} (5 clients each), crop+flip, eval batch 20 once
at the end; the 1 ... 1/256 sweep is off (`--config.hetero.sweep_every=30` with
`--config.hetero.sweep='(1,0.5,...)'` or the fiarse_cifar10 defaults turn it on).
Expected runtime: about 1.5 min per run on a 2-core CPU shared with other jobs.
Expected result: far below the paper (short training, tiny model); see
docs/results/fiarse.md for the measured table and ordering.
"""
from experiments.configs import fiarse_cifar10


def get_config(arg: str | None = None):
  c = fiarse_cifar10.base_config(arg or "fiarse")
  c.data.data_dir = "../shared/data/cifar10/fedlore_pfllib_dir0.3_100clients"
  c.hetero.repartition = ""
  c.model.width_multiplier = 1 / 8
  c.client.num_steps = 10
  c.rounds = 30
  c.clients_per_round = 5
  c.eval_every = 30
  c.hetero.sweep = ()
  c.hetero.sweep_every = 0
  c.strategy = "sequential+tapgrad"
  c.progress = False
  return c
