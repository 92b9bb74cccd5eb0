"""FedAvg with the LEAF FEMNIST CNN on real FEMNIST (300 writers, offline copy).

Command:
  python -m experiments.main --config experiments/configs/fedavg_femnist.py --workdir workdir/femnist

Data: the three LEAF 5% samples in ../shared/data/femnist merged by writer
(300 writers with train data; 41,456 train / 4,759 test images), natural
by-writer split. 10 clients/round, 1 local epoch, batch 32, SGD lr 0.05 (an
independent plain-JAX FedAvg of the same CNN reached 0.73 test accuracy after
100 rounds on one source: docs/results/fedavg.md). Measured numbers: docs/results/.
"""
from experiments.configs import fedavg_synthetic

SOURCES = ("wenzhu23333_Federated-Learning", "slz-ai_leaf-torch", "arakotom_flic")


def get_config(arg: str | None = None):
  c = fedavg_synthetic.get_config()
  root = arg or "../shared/data/femnist"
  c.data.name = "femnist_leaf"
  c.data.data_dir = ",".join(f"{root}/{s}" for s in SOURCES)
  c.model.name = "leaf_femnist_cnn"
  c.algorithm.name = "fedavg"
  c.client.learning_rate = 0.05
  c.rounds = 100
  c.clients_per_round = 10
  c.eval_every = 10
  return c
