"""ASP with the paper's Inception-style model, CelebA hyper-parameters.

Command:
  python -m experiments.main --config experiments/configs/asp_inception_celeba.py --workdir workdir/asp_incep_celeba

Setting (the paper's official code): widths as FEMNIST, 500 rounds, 50 clients/round,
5 local epochs, batch 32, Adam lr 1e-3, k = 2.4, MAX_PRUNED_ROUND 100,
patience 3. Runs on the synthetic 2-class stand-in until CelebA is wired into
experiments/build.py (see asp_celeba_cnn.py). Expected runtime: ~3 h on a
2-core CPU. Paper (real CelebA, 84x84x3): 243,752 -> 127,080 params (-47.9 %),
FLOPs -47 %, 72.1 % accuracy pruned.
"""
from experiments.configs import asp_celeba_cnn, asp_femnist_cnn, fedavg_synthetic


def get_config(arg: str | None = None):
  del arg
  c = fedavg_synthetic.get_config()
  asp_celeba_cnn.celeba_stand_in(c)
  c.model.name = "asp_inception"
  asp_femnist_cnn.paper_training(c, clients_per_round=50)
  c.asp = asp_femnist_cnn.asp_fields(k=2.4, max_pruned_round=100)
  c.eval_every = 20
  return c
