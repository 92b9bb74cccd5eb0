"""ASP with the paper's ResNet-style model [16, 32, 64], CelebA hyper-parameters.

Command:
  python -m experiments.main --config experiments/configs/asp_resnet_celeba.py --workdir workdir/asp_resnet_celeba

Setting (the paper's official code): 500 rounds, 50 clients/round, 5 local epochs,
batch 32, Adam lr 1e-3, k = 2.0, MAX_PRUNED_ROUND 50, patience 3. Runs on the
synthetic 2-class stand-in until CelebA is wired into experiments/build.py (see
asp_celeba_cnn.py). Expected runtime: ~1 h on a 2-core CPU. Paper (real
CelebA, official notebook): 30,626 -> 6,791 params (-77.8 %), FLOPs -69 %,
89.5 % -> 85.8 % accuracy.
"""
from experiments.configs import asp_celeba_cnn, asp_femnist_cnn, fedavg_synthetic


def get_config(arg: str | None = None):
  del arg
  c = fedavg_synthetic.get_config()
  asp_celeba_cnn.celeba_stand_in(c)
  c.model.name = "asp_resnet"
  c.model.norm = "batch_running"
  asp_femnist_cnn.paper_training(c, clients_per_round=50)
  c.asp = asp_femnist_cnn.asp_fields(k=2.0, max_pruned_round=50)
  c.eval_every = 20
  return c
