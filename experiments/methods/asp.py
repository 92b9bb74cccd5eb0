"""Driver for Automatic Structured Pruning (config.method='asp') and the fixed-ratio
L1-filter baseline (config.method='l1_filter').

ASP (fedjax_prune.pruning.auto_structured): before every round of phase 1 the
server applies the mean +- k std rule to the aggregated model; an accepted
(smaller) candidate is rebuilt -- re-initialised by default -- and the round is
re-jitted once for the new shapes. Phase 2 is FedAvg on the found architecture.
L1 filter (fedjax_prune.pruning.l1_filter): dense FedAvg for
`l1_filter.prune_round` rounds, then every prunable conv loses `l1_filter.ratio`
of its filters (smallest L1), surviving weights kept, and FedAvg fine-tunes.

Per-round metrics records: the FedAvg train metrics, eval metrics every
`eval_every` rounds, `phase` ('search' while ASP may still prune, 'train'
after; 'dense'/'train' for l1_filter), `params`, `flops` (batch 1,
fedjax_prune.accounting), `bytes_up` / `bytes_down` of the whole cohort this
round (dense float32 model incl. BN running statistics), `cum_bytes` (up +
down since round 1), `dense_cum_bytes` (the same for FedAvg on the dense model)
and `accepted` (1 when the architecture changed before this round), and the
dead-channel diagnostic on 64 training examples (`active_channels`: the fraction of
conv channels that fire; `active_channels_min`: the least active layer's; conv models only).

Client votes (config.asp.decision='client_votes'; default 'server', the paper): the clients
score their own trained filters and vote by the same rule inside the round; before the
next round the server keeps a filter when more than config.asp.vote_threshold of the
voters keep it (tallies noised with config.asp.vote_noise_multiplier z: std z * sqrt(filters
voted on)), then rebuilds as with its own scores (`pruning.auto_structured`, "Client
votes"). Records then also carry the round's tallies (`votes/<group>`, `voters`) and
`bytes_up` includes the vote bits; with z > 0 also `vote_epsilon`, the tallies' epsilon so
far at config.asp.vote_delta (default 1e-3; `build.vote_epsilons`: every round releases
its tallies). Conv and text models (units, heads); with config.robust / config.attack /
config.privacy / config.compression a client votes on the model it trained, before its
update is attacked, clipped, noised or compressed (`rebuilding_fedavg(update_aggregator=)`;
the votes' bits are added to the measured `bytes_up`); a data-side attacker (label flip,
backdoor) votes on its poisoned model.

Text models (config.model.name 'shakespeare_lstm' / 'shakespeare_transformer'): the same
rule per LSTM layer over its units and per transformer block over its heads and its FFN
units (L1 of incoming kernels, `structured.group_l1`), rebuilt by `structured.shrink`
(`pruning.auto_structured` module docstring); the L1-filter baseline prunes the same groups.

Checkpoints hold the FedAvg ServerState of the current architecture; `meta`
holds the spec as JSON (`structured.spec_to_json`), so a resumed run rebuilds
the right shapes before restoring, plus the ASP search state, the cumulative
bytes and the strategy.
"""
from __future__ import annotations

import jax
import numpy as np

from experiments import build as build_lib, runtime
from fedjax_prune import models
from fedjax_prune.pruning import auto_structured, l1_filter

_CONV_MODELS = ("leaf_femnist_cnn", "asp_femnist_cnn", "asp_celeba_cnn", "vgg11", "resnet18",
                "resnet20", "resnet56", "asp_resnet", "asp_inception")
# Text models: the rule per LSTM layer's units / block's heads / block's FFN units.
_MODELS = _CONV_MODELS + build_lib.TEXT_MODELS


def _field(config, path, default):
  node = config
  for part in path.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


def _bad(path, value, allowed):
  raise build_lib.ConfigError(f"config.{path}={value!r} is invalid: allowed {allowed}")


def _check_int(config, path, default, lo):
  v = _field(config, path, default)
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    _bad(path, v, f"an integer in [{lo}, inf]")


def validate(config) -> None:
  """Checks config.model.name and the config.asp / config.l1_filter fields."""
  if config.model.name not in _MODELS:
    _bad("model.name", config.model.name, f"a conv or text model for structured pruning: {_MODELS}")
  method = config.get("method", "asp")
  _check_kernel_init(config)
  if config.model.name in build_lib.TEXT_MODELS and _field(config, "asp.kernel_init",
                                                           "default") != "default":
    _bad("asp.kernel_init", _field(config, "asp.kernel_init", "default"),
         "'default' for text models (their own LEAF / GPT-2 initialisation)")
  widths = _field(config, "asp.widths", ())
  if not isinstance(widths, (tuple, list)) or not all(
      isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
    _bad("asp.widths", widths, "a tuple of positive ints (empty = the model's preset widths)")
  if method == "l1_filter":
    ratio = _field(config, "l1_filter.ratio", 0.5)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
      _bad("l1_filter.ratio", ratio, "a number in [0, 1)")
    prune_round = _field(config, "l1_filter.prune_round", 0)
    if isinstance(prune_round, bool) or not isinstance(prune_round, int) or not (
        0 <= prune_round < config.rounds):
      _bad("l1_filter.prune_round", prune_round, f"an integer in [0, {config.rounds - 1}]")
    return
  k = _field(config, "asp.k", 2.2)
  if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 0:
    _bad("asp.k", k, "a number >= 0")
  tails = _field(config, "asp.tails", None)
  if tails is not None and tails not in auto_structured.TAILS:
    _bad("asp.tails", tails, f"one of {auto_structured.TAILS} or None (by asp.reinit_on_prune)")
  _check_int(config, "asp.max_patience", 3, 1)
  _check_int(config, "asp.max_pruned_round", 50, 0)
  _check_int(config, "asp.rounds_between_prunes", 1, 1)
  _check_decision(config)
  reinit = _field(config, "asp.reinit_on_prune", True)
  if not isinstance(reinit, bool):
    _bad("asp.reinit_on_prune", reinit, "True or False")
  if tails == "both" and not reinit:
    raise build_lib.ConfigError(
        "config.asp.tails='both' with config.asp.reinit_on_prune=False is refused: keeping the "
        "weights while removing the largest-L1 filters (the upper tail) kills the network; set "
        "config.asp.tails='lower' (or None) to keep the weights, or reinit_on_prune=True")


DECISIONS = ("server", "client_votes")


def _check_decision(config) -> None:
  """config.asp.decision and, for 'client_votes', its fields and what it runs with."""
  decision = _field(config, "asp.decision", "server")
  if decision not in DECISIONS:
    _bad("asp.decision", decision, f"one of {DECISIONS}")
  if decision != "client_votes":
    return
  threshold = _field(config, "asp.vote_threshold", 0.5)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
      0 <= threshold < 1):
    _bad("asp.vote_threshold", threshold, "a number in [0, 1) (fraction of the voters)")
  z = _field(config, "asp.vote_noise_multiplier", 0.0)
  if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
    _bad("asp.vote_noise_multiplier", z, "a number >= 0 (0 = exact tallies)")
  delta = _field(config, "asp.vote_delta", build_lib.VOTE_DELTA)
  if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
    _bad("asp.vote_delta", delta, "a number in (0, 1) (the delta of the votes' epsilon)")


def extendable(config) -> str | None:
  """None: ASP's search (patience, `max_pruned_round`, `rounds_between_prunes`) and the L1
  filter's `prune_round` are fixed rounds, FedAvg has no schedule: nothing depends on
  config.rounds, so a run can be extended to more rounds (`train.check_extension`)."""
  del config
  return None


def _check_kernel_init(config) -> None:
  kernel_init = _field(config, "asp.kernel_init", "default")
  if kernel_init not in KERNEL_INITS:
    _bad("asp.kernel_init", kernel_init, f"one of {tuple(KERNEL_INITS)}")


# How conv/dense kernels are initialised (the dense start and every re-initialisation):
# 'default' the library's PyTorch rule, 'glorot_uniform' the Keras default of the official code.
KERNEL_INITS = {"default": None, "glorot_uniform": jax.nn.initializers.glorot_uniform}


def init_fn(config):
  """`(spec, key) -> (params, batch_stats)` with config.asp.kernel_init."""
  make = KERNEL_INITS[_field(config, "asp.kernel_init", "default")]
  kernel_init_fn = None if make is None else make()
  return lambda spec, key: models.init_params(spec, key, kernel_init_fn=kernel_init_fn)


def build_spec(config, data):
  """The dense starting spec on the data's input shape; `config.asp.widths` (if set)
  replaces the preset widths."""
  spec = build_lib.build_spec(config, data.input_shape, data.num_classes)
  widths = tuple(_field(config, "asp.widths", ()))
  name, kw = config.model.name, dict(num_classes=data.num_classes, input_shape=data.input_shape)
  if not widths:
    if name == "asp_celeba_cnn":  # build_lib.build_spec keeps the 84x84x3 preset input
      return models.asp_celeba_cnn(**kw)
    return spec
  try:
    if name == "asp_femnist_cnn":
      return models.asp_femnist_cnn(widths=widths, **kw)
    if name == "asp_celeba_cnn":
      return models.asp_celeba_cnn(widths=widths, **kw)
    if name == "asp_resnet":
      return models.asp_resnet(widths=widths, norm="batch_running", **kw)
    if name == "asp_inception":
      return models.asp_inception(widths=widths, **kw)
  except ValueError as e:  # the model factory's checks of the widths (e.g. too many convs)
    raise build_lib.ConfigError(f"config.asp.widths={widths!r} is invalid for {name} on "
                                f"{tuple(data.input_shape)} inputs: {e}") from e
  raise build_lib.ConfigError(f"config.asp.widths is only supported for the asp_* models, not "
                          f"{name!r}")


def probe_batch(train, size: int = 64):
  """The dead-channel diagnostic's batch: the first `size` training examples, taken one
  per client in turn (so a few writers do not make up the whole batch)."""
  n = np.asarray(train.num_examples)
  picked = []  # (client, example): example 0 of every client, then example 1, ...
  for e in range(int(n.max())):
    picked += [(c, e) for c in np.flatnonzero(n > e)[:size - len(picked)]]
    if len(picked) == size:
      break
  clients, examples = (np.asarray(v) for v in zip(*picked))
  return jax.numpy.asarray(np.asarray(train.x)[clients, examples])


def make_policy(config):
  """ASP as the driver uses it (a library AutoStructured)."""
  a = lambda name, default: _field(config, f"asp.{name}", default)
  votes = None
  if a("decision", "server") == "client_votes":
    votes = auto_structured.ClientVotes(threshold=float(a("vote_threshold", 0.5)),
                                        noise_multiplier=float(a("vote_noise_multiplier", 0.0)))
  return auto_structured.auto_structured(
      k=float(a("k", 2.2)), tails=a("tails", None), max_patience=a("max_patience", 3),
      max_pruned_round=a("max_pruned_round", 50), reinit_on_prune=a("reinit_on_prune", True),
      rounds_between_prunes=a("rounds_between_prunes", 1), init_fn=init_fn(config),
      client_votes=votes)


def build(config, env: runtime.Env) -> runtime.Run:
  """The ASP (`pruning.auto_structured.asp`) or L1-filter (`pruning.l1_filter.l1_filter`)
  `Method` of `config`."""
  data = env.data
  spec = build_spec(config, data)
  init_key = jax.random.key(config.seeds.init)
  params, batch_stats = init_fn(config)(spec, init_key)
  # A resumed run gets the checkpoint's strategy (runtime.choose_strategy).
  algorithm_for = lambda apply_fn, schedule: build_lib.build_algorithm(config, apply_fn, schedule,
                                                                       data=data)
  strategy, timings = runtime.choose_strategy(env, spec, params, batch_stats,
                                              algorithm_for, runtime.cohort_for(env, 0))
  env.log(f"client execution: {strategy.name}")
  # The dead-channel diagnostic reads conv activations; text models have none.
  probe_x = None if isinstance(spec, models.TEXT_SPECS) else probe_batch(data.train)
  # Voting clients vote on the model they trained, before DP / compression rewrite its
  # update: the plain mean inside, the config's aggregator around the votes.
  voting = (config.get("method", "asp") == "asp"
            and _field(config, "asp.decision", "server") == "client_votes")
  wrap_votes = voting and build_lib.aggregation_active(config)
  common = dict(spec=spec, params=params, batch_stats=batch_stats, key=init_key,
                fedavg_for=lambda apply_fn: build_lib.build_algorithm(
                    config, apply_fn, data=data, plain_mean=wrap_votes),
                model=runtime.model_fns(env, strategy), clients_per_round=config.clients_per_round,
                probe_x=probe_x, log=env.log)
  if config.get("method", "asp") == "asp":
    if wrap_votes:
      common["update_aggregator"] = build_lib.full_aggregator(config, data)
    method = auto_structured.asp(make_policy(config), **common)
  else:
    method = l1_filter.l1_filter(float(_field(config, "l1_filter.ratio", 0.5)),
                                 _field(config, "l1_filter.prune_round", 0), **common)
  return runtime.Run(method, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))
