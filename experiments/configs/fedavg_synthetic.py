"""FedAvg on the embedded synthetic FEMNIST-like benchmark (the default main job).

Command:
  python -m experiments.main --config experiments/configs/fedavg_synthetic.py --workdir /tmp/fedavg_synth

Data: 100 seeded synthetic writers (10 glyph classes, 28x28x1, 40-120 train
examples each, Dirichlet(0.5) label skew, writer-specific distortions), made by
the project itself: no download. Model: the LEAF FEMNIST CNN (10 outputs).
Expected: test accuracy well above the 10 % chance level within 20 rounds
(see docs/results/ for the measured value), about a minute on a 2-core CPU.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.method = "fedavg"  # the FedAvg family; derived configs set their method (asp, cavp, ...)
  c.seeds = ml_collections.ConfigDict(dict(init=0, sampling=1, training=2, data=3))
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic", num_clients=100, num_classes=10, examples_per_client=(40, 120),
      test_examples_per_client=20, label_skew_alpha=0.5, data_dir=""))
  c.model = ml_collections.ConfigDict(dict(name="leaf_femnist_cnn", hidden=(200, 200), norm="none",
                                           width_multiplier=1.0,
                                           compute_dtype="float32"))  # or "bfloat16": bf16 GEMMs
  c.algorithm = ml_collections.ConfigDict(dict(
      name="fedavg", server_learning_rate=1.0, server_momentum=0.9, prox_mu=0.01))
  c.client = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=0.05, momentum=0.0, batch_size=32, num_epochs=1, num_steps=0))
  c.rounds = 20
  c.clients_per_round = 10
  c.eval_every = 5
  c.eval_batch_size = 256
  # Client execution: 'auto' (measured, cached), or a name such as
  # 'sequential+lax', 'vmap+im2col', 'chunked4+im2col'.
  c.strategy = "auto"
  c.strategy_cache = ""  # '' = $XDG_CACHE_HOME/fedjax_prune/strategy.json
  c.shard_clients = True  # shard the cohort over all local devices when there are several
  # CPU runs: JAX devices the host is split into before JAX starts (0 = one per usable core),
  # so sharded clients run on different cores at once (1.2-1.4x on 2 cores; 1 = off).
  c.cpu_devices = 0
  c.progress = True
  c.checkpoint_every = 10  # rounds between checkpoints (0 = none); resume with --resume
  c.checkpoint_keep = 3    # most recent checkpoints kept
  c.tensorboard = False    # also log TensorBoard scalars (needs tensorboardX)
  # Optional one-shot global magnitude pruning after `prune_round` rounds (1.0 = off).
  c.prune_density = 1.0
  c.prune_round = 0
  return c


def sweep(add):
  for lr in (0.02, 0.05, 0.1):
    add(**{"client.learning_rate": lr})
