"""ASP with the paper's ResNet-style model [16, 32, 64] on real FEMNIST.

Command:
  python -m experiments.main --config experiments/configs/asp_resnet_femnist.py --workdir workdir/asp_resnet_femnist

Setting (the paper's official code): stem conv3x3/2 (16) -> BN -> pool, two blocks of
inner widths 32 and 64 (stride 2, residual width 16, 1x1 shortcuts), flatten ->
62; 500 rounds, 10 clients/round, 5 local epochs, batch 32, Adam lr 1e-3,
k = 2.5, MAX_PRUNED_ROUND 100, patience 3; BN running statistics averaged by
FedAvg. Expected runtime: ~1-2 h on a 2-core CPU. The official repo prints no
FEMNIST ResNet result (only a CelebA one).
"""
from experiments.configs import asp_femnist_cnn


def get_config(arg: str | None = None):
  c = asp_femnist_cnn.get_config(arg)
  c.model.name = "asp_resnet"
  c.model.norm = "batch_running"
  asp_femnist_cnn.paper_training(c, clients_per_round=10)
  c.asp = asp_femnist_cnn.asp_fields(k=2.5, max_pruned_round=100)
  return c
