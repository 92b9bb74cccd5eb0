"""FedAvg with LEAF's char-LSTM (or a small transformer) on real Shakespeare (LEAF split).

Commands (arg: comma-separated, 'lstm' or 'transformer', optionally 'tiny' and at most one
method part: 'asp', 'fiarse', 'heterofl', 'fedrolex', 'cavp' (model default: transformer) or
'fedtiny' (model default: lstm); without a method part, FedAvg on the LSTM):
  python -m experiments.main --config experiments/configs/fedavg_shakespeare.py \
      --workdir workdir/shakespeare_lstm
  python -m experiments.main --config experiments/configs/fedavg_shakespeare.py:transformer \
      --workdir workdir/shakespeare_transformer
  python -m experiments.main --config experiments/configs/fedavg_shakespeare.py:tiny --workdir /tmp/t
  python -m experiments.main --config experiments/configs/fedavg_shakespeare.py:heterofl \
      --workdir workdir/shakespeare_heterofl
  python -m experiments.main --config experiments/configs/fedavg_shakespeare.py:fedtiny,tiny \
      --workdir /tmp/t_fedtiny
  python -m experiments.main --config experiments/configs/fedavg_shakespeare.py:cavp,tiny \
      --workdir /tmp/t_cavp

Data: TFF's Shakespeare files in ../shared/data/shakespeare (LEAF's data, one client per
speaking role, TFF's own train/test split of each role's lines): 643 of the 715 roles
have at least one 80-character window (the rest are dropped), LEAF's 80-letter
vocabulary + an out-of-vocabulary id (81 classes), target = the character after each
window (LEAF, stride 1). A role has up to 69 k windows (2.3 M in all), and the stacked
engine pads every client to the longest, so train windows are capped per client
(`data.max_windows_per_client`, evenly spaced over the role's text; most roles hit
the cap, which also makes FedAvg's example weights nearly uniform) and so are test
windows (`data.max_test_windows_per_client`, keeps evaluation affordable on CPU).

Setting (LEAF's baseline, TalwalkarLab/leaf `paper_experiments/shakespeare.sh`,
`models/shakespeare/stacked_lstm.py`, `models/utils/args.py`): the 2-layer 256-unit
LSTM on an 8-dim embedding, last-position softmax; 10 clients/round, 1 local epoch,
plain SGD with learning rate 0.8, batch 10 (LEAF's `--batch_size` default), server
learning rate 1 (plain FedAvg). LEAF's script runs 80 rounds on its 5 % sample of
roles. FedJAX's `fedjax/models/shakespeare.py` (`create_lstm_model`) is the same
architecture (embedding 8, 2 x LSTM 256; 820,522 params with its 90-token
vocabulary, 818,137 here with 81).

Published accuracy: LEAF reports Shakespeare only as curves in its figures (Caldas et
al. 2018, arXiv:1812.01097; 80 rounds, no table value found). Reddi et al., "Adaptive Federated
Optimization" (ICLR 2021, arXiv:2003.00295) table of final accuracies gives
FedAvg on TFF's Shakespeare about 57 % (1200 rounds, 10 clients/round, 1 epoch,
batch 4, client SGD; their data keeps every window) -- that number was recalled, not
re-read, while writing this file: check it against the paper before quoting it.

Measured (3-round runs, 2-core CPU shared with other jobs, load average ~7, LSTM, caps
256 / 32): one round (10 clients x 26 local steps of batch 10) took 19-20 s with
'sequential+lax' and 26-29 s with 'vmap+lax' (sharded over the 2 CPU devices), the
first ~10 s more (compilation); one evaluation of the ~20 k capped test windows (central
and per-client) took ~55 s. Train loss 4.11 -> 3.50 -> 3.37 over rounds 1-3.
Execution (measured 2026-12-07, quiet 2-core Intel Xeon, other jobs paused, rounds 2-4 of
4-round runs; identical losses): the LSTM's clients sharded over the two cores, 5 each
('sequential+lax+sharded'), 9.5-11.6 s a round vs 15.5-19.7 s unsharded ('sequential+lax'):
1.7x, since a batch-10 LSTM step is too small to spread over two cores (6.0-7.5 s sharded
since the LSTM's custom backward pass, session 23: a 1000-round run ~2 h). The transformer
gains less: 12.2-15.4 s sharded vs 12.4-16.3 s unsharded, 13.2-13.6 s 'vmap+lax' unsharded
(18 s sharded; 7.8-9.7 s sharded since the residual-stream fix of its backward pass,
session 23, docs/results/text.md); within 5 %, so every full-size run here names 'sequential+lax+sharded' (no
calibration at the start; the grouped width methods need a sequential strategy).
Engine benchmark rows: docs/results/text.md.
Expected: a plateau near 0.45-0.5 test accuracy (not yet run; LEAF's curves and the
~57 % above are for more local steps per round) should take several hundred rounds at 26
local steps per client and round (a round is a small fraction of an epoch over the
data), hence `rounds = 1000`, eval every 20: ~5.5 h of rounds + ~45 min of evaluation on
that CPU, far over REPRODUCE.md's 15-minute CPU run: a GPU job, or a resumable sweep over
several sessions. REPRODUCE.md §1: convergence is judged on the curve's last 20 %; raise
`rounds` if it still climbs.

The sweeps (`sweep(add, arg)`, run by `experiments/converged_sweeps.sh` as text_lstm_dense,
text_tr_dense, text_tr_asp, ...; 3 seeds each). Rule fixed 2026-12-07 (session 25) before
any text run, so that no result can steer it: each model's dense seed 0 trains the full
`rounds` (1000) and shows the plateau; every other run of that model (dense seeds 1, 2 and
every method's seeds 0-2) trains R rounds, R = `curves.plateau_round` of that dense seed-0
curve: the first evaluated round by which the curve cut there is converged (§1, its last
20 % gain < 1 point, each end the mean of 3 evaluations) and within 1 point of the full
run's plateau (the mean of its last 3 evaluations). The dense seed-0 row of a table is
its evaluation at round R (constant learning rates, no schedule tied to the total: the
same as a run of R rounds). Why: 18 runs of 1000 rounds are ~45 h on the 2-core CPU, ~5x
REPRODUCE.md §5's budget; rounds past the plateau measure nothing. Until the dense
seed-0 run is archived (docs/results/runs/text_*_dense) its sweep holds that one run and
the method sweeps none; the queue re-runs a sweep whose grid grew. A dense seed 0 not
converged in `rounds` stops them with an error that gives its gain (raise `rounds`).

'transformer': the causal pre-norm transformer (4 x d 128, 4 heads, FFN 512, context
80; 824,401 params), same data and FedAvg, plain SGD as for the LSTM, with a
smaller learning rate (0.1; the LSTM's 0.8 was not tuned for it: choose once on the
dense run, REPRODUCE.md §2).
'tiny': 8 clients of seeded synthetic text (a phrase repeated from random offsets, 5 %
noise: accuracy up to about 0.95), windows of 16, a 1 x 16 LSTM (or a 1-block d 16
transformer), 3 clients/round, 4 rounds: seconds on a CPU (tests, notebooks).
'asp': the same run through Automatic Structured Pruning (config.method='asp'): the
mean +- k std rule per LSTM layer's units / block's heads / block's FFN units, k = 2.2
(the paper's FEMNIST CNN value: the paper has no text setting), search in rounds
1-50, re-initialised rebuilds (tiny: k = 1, search in round 1).
'fiarse', 'heterofl', 'fedrolex': the model-heterogeneous methods
(experiments/methods/hetero.py) on the transformer, capacities {1, 1/4, 1/16} assigned to
clients i mod 3 (width r keeps ceil(r n) heads and ceil(r F) FFN units per block, the
embeddings and d_model full; FIARSE: one global magnitude threshold), scaler on, no
augmentation or re-partition (the speakers are the clients), server learning rate 1;
evaluated on the global test set per level (`global_<s>`; the config's `eval_batch_size`).
The same client optimizer and schedule as the dense run (choose the learning rate once on
the dense run, REPRODUCE.md §2).
'fedtiny': FedTiny (experiments/methods/fedtiny.py) on the LSTM at density 0.2 (uniform
layer densities: its kernels pruned, the embedding table and biases dense), 3 ABNS
candidates, progressive prune-and-grow over 2 blocks input to output, the paper's schedule
(ΔT 10, T_end 300 per 500 rounds) scaled to `rounds` (tiny: a 1 x 32 LSTM, 2 candidates,
all layers adjusted in rounds 1-2 of 4; at 1 x 16 the dense embedding table and biases
alone are 22 % of the parameters, over the 0.2 budget).
'cavp': complexity-aware training (CAT, experiments/methods/cavp.py, arXiv 2411.09127; the
paper has no text model, so the gates here are our extension) in its federated mode: the
clients' Bernoulli gates on the transformer's attention heads, FFN units and whole blocks
(structures 'both'; with 'lstm': the LSTM's hidden units, 'units' only, since an LSTM layer
has no residual path), the same client optimizer and schedule as the dense run, θ by
projected SGD, a rebuild without the pruned structures every 20 rounds (tiny: every 2).
The cost weights (gamma 1, alpha 1, beta 0.5) and θ's learning rate (0.1) are
cavp_cifar10.py's, not tuned on text (choose them once on the dense run, REPRODUCE.md §2;
'tiny' is a smoke run: measured, its single block's layer gate reaches 0 within its 4 rounds).
Dense baseline through the same driver: --config.cavp.theta_learning_rate=0
--config.cavp.theta_init=1.0.
"""
import os

import ml_collections

from experiments import curves
from experiments.configs import (asp_femnist_cnn, cavp_cifar10, fedavg_synthetic, fedtiny_cifar10,
                                 fiarse_cifar10)

MODELS = {"lstm": "shakespeare_lstm", "transformer": "shakespeare_transformer"}
HETERO = ("fiarse", "heterofl", "fedrolex")
# Method parts and the model each uses unless the arg names one.
METHODS = {"asp": "lstm", **dict.fromkeys(HETERO, "transformer"), "fedtiny": "lstm",
           "cavp": "transformer"}
CAPACITIES = (1.0, 1 / 4, 1 / 16)
# The dense sweep of each model (`experiments/converged_sweeps.sh` names; archived under
# docs/results/runs/): its seed-0 curve sets the rounds of every other run (`method_rounds`).
DENSE_SWEEPS = {"lstm": "text_lstm_dense", "transformer": "text_tr_dense"}
DENSITY = 0.2


def _parse(arg: str | None) -> tuple[str, bool, str]:
  """(model key, tiny, method part or '' for FedAvg) from the config arg."""
  parts = [p for p in (arg or "").split(",") if p]
  unknown = [p for p in parts if p not in (*MODELS, "tiny", *METHODS)]
  if unknown:
    raise ValueError(f"config arg parts must be 'lstm', 'transformer', 'tiny' or one of "
                     f"{tuple(METHODS)}, got {unknown} in {arg!r}")
  methods = [p for p in parts if p in METHODS]
  models = [p for p in parts if p in MODELS]
  if len(methods) > 1 or len(set(models)) > 1:
    raise ValueError(f"config arg names more than one method or model: {arg!r}")
  method = methods[0] if methods else ""
  model = models[0] if models else METHODS.get(method, "lstm")
  return model, "tiny" in parts, method


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model, tiny, method = _parse(arg)
  asp = method == "asp"
  c = fedavg_synthetic.get_config()
  c.data = ml_collections.ConfigDict(dict(
      name="shakespeare", data_dir="../shared/data/shakespeare", max_windows_per_client=256,
      max_test_windows_per_client=32, stride=1))
  c.model = ml_collections.ConfigDict(dict(
      name=MODELS[model], hidden=(256, 256), embed_dim=8,          # LSTM
      num_layers=4, d_model=128, num_heads=4, ffn_width=0,        # transformer (0: 4 d_model)
      norm="none", width_multiplier=1.0, compute_dtype="float32"))
  c.algorithm.name = "fedavg"
  c.algorithm.server_learning_rate = 1.0
  c.client = ml_collections.ConfigDict(dict(
      optimizer="sgd", learning_rate=0.8 if model == "lstm" else 0.1, momentum=0.0,
      batch_size=10, num_epochs=1, num_steps=0))
  c.rounds = 1000
  c.clients_per_round = 10
  c.eval_every = 20
  c.eval_batch_size = 512
  c.checkpoint_every = 20
  c.strategy = "sequential+lax+sharded"  # 1.7x a LSTM round on 2 cores (docstring)
  c.shard_clients = True
  if tiny:
    c.data = ml_collections.ConfigDict(dict(
        name="synthetic_text", num_clients=8, examples_per_client=(24, 40),
        test_examples_per_client=8, seq_len=16, noise=0.05))
    c.model.hidden, c.model.embed_dim = (16,), 8
    c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 16, 2
    c.client.learning_rate = 0.8 if model == "lstm" else 0.1
    c.client.batch_size = 8
    c.rounds = 4
    c.clients_per_round = 3
    c.eval_every = 2
    c.eval_batch_size = 64
    c.checkpoint_every = 2
    c.strategy = "vmap+lax"
    c.shard_clients = False  # one device: compiles once, fastest for a few tiny clients
    c.progress = False
  if asp:
    c.method = "asp"
    c.asp = asp_femnist_cnn.asp_fields(k=1.0 if tiny else 2.2, max_pruned_round=1 if tiny else 50)
    c.asp.kernel_init = "default"  # the text models' own (LEAF / GPT-2) initialisation
  if method in HETERO:
    c.method = method
    c.hetero = fiarse_cifar10.base_config(method).hetero
    c.hetero.update(dict(capacities=CAPACITIES, augment=False, repartition="", sweep=(),
                         sweep_every=0))
  if method == "fedtiny":
    c.method = "fedtiny"
    c.sparse = fedtiny_cifar10.base_config().sparse
    c.sparse.update(dict(density=DENSITY, distribution="uniform", num_candidates=3,
                         num_blocks=2, progressive="blockwise"))
    if tiny:  # all layers adjusted every round before round 3; LSTM 32 wide, since at 16
      # the embedding table and biases (dense) alone are 0.22 of the parameters
      c.model.hidden = (32,)
      c.sparse.update(dict(num_candidates=2, progressive="all_layers", num_blocks=1,
                           adjust_every=1, adjust_end=3))
  if method == "cavp":
    c.method = "cavp"
    c.cavp = cavp_cifar10.get_config("cpu,federated,both").cavp  # the three user parameters, ...
    # (cavp refuses strategy='auto': the named strategies above are kept)
    c.cavp.update(dict(structures="both" if model == "transformer" else "units",
                       rebuild_every=2 if tiny else 20))
  return c


def dense_archive(model: str) -> str:
  """The archive of the dense sweep of `model` ('lstm' or 'transformer')."""
  return os.path.join(cavp_cifar10.RUNS_ARCHIVE, DENSE_SWEEPS[model])


def method_rounds(model: str, archive: str | None = None) -> int | None:
  """The rounds every run of `model` but the dense seed 0 trains: `curves.plateau_round` of
  the dense seed-0 run's curve (the first evaluated round by which it is converged and
  within 1 point of its plateau; the rule of the docstring). None until that run has
  finished in `archive` (default: `dense_archive(model)`).

  Raises:
    ValueError: the dense seed-0 run did not converge in its rounds (raise `rounds`), or two
      finished seed-0 runs of different settings are archived.
  """
  archive = archive or dense_archive(model)
  found = [(run, int(config["rounds"])) for run, config in curves.archived_runs(archive)
           if all(config["seeds"][k] == 0 for k in ("init", "sampling", "training"))]
  if not found:
    return None
  if len(found) > 1:
    raise ValueError(f"{archive!r} holds {len(found)} finished dense seed-0 runs "
                     f"({[os.path.basename(r) for r, _ in found]}): the archive mixes settings")
  run, rounds = found[0]
  try:
    return curves.plateau_round(curves.read_curve(run), rounds)
  except ValueError as e:
    raise ValueError(f"the dense {model} run {run!r}: {e}") from None


def sweep(add, arg=None):
  """Three seeds of the setting `arg` names (the queue's text_* sweeps). The dense seed 0
  trains the config's `rounds`; every other run trains `method_rounds(model)` and waits
  for it (adds nothing until it is known). 'tiny': three seeds of the smoke run."""
  model, tiny, method = _parse(arg)
  rounds = None if tiny else method_rounds(model)
  for seed in (0, 1, 2):
    seeds = {"seeds.init": seed, "seeds.sampling": seed, "seeds.training": seed}
    if tiny or (not method and seed == 0):
      add(**seeds)
    elif rounds is not None:
      add(**seeds, rounds=rounds)
