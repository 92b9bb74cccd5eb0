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
and `accepted` (1 when the architecture changed before this round).

Checkpoints hold the FedAvg ServerState of the current architecture; `meta`
holds the spec as JSON (`structured.spec_to_json`), so a resumed run rebuilds
the right shapes before restoring, plus the ASP search state, the cumulative
bytes and the strategy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import build as build_lib, runtime
from fedjax_prune import accounting, federated, models, structured
from fedjax_prune.pruning import auto_structured, l1_filter

_CONV_MODELS = ("leaf_femnist_cnn", "asp_femnist_cnn", "asp_celeba_cnn", "vgg11", "resnet18",
                "resnet20", "resnet56", "asp_resnet", "asp_inception")


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
  if config.model.name not in _CONV_MODELS:
    _bad("model.name", config.model.name, f"a conv model for structured pruning: {_CONV_MODELS}")
  method = config.get("method", "asp")
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
  tails = _field(config, "asp.tails", "both")
  if tails not in auto_structured.TAILS:
    _bad("asp.tails", tails, f"one of {auto_structured.TAILS}")
  _check_int(config, "asp.max_patience", 3, 1)
  _check_int(config, "asp.max_pruned_round", 50, 0)
  _check_int(config, "asp.rounds_between_prunes", 1, 1)
  reinit = _field(config, "asp.reinit_on_prune", True)
  if not isinstance(reinit, bool):
    _bad("asp.reinit_on_prune", reinit, "True or False")


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
  if name == "asp_femnist_cnn":
    return models.asp_femnist_cnn(widths=widths, **kw)
  if name == "asp_celeba_cnn":
    return models.asp_celeba_cnn(widths=widths, **kw)
  if name == "asp_resnet":
    return models.asp_resnet(widths=widths, norm="batch_running", **kw)
  if name == "asp_inception":
    return models.asp_inception(widths=widths, **kw)
  raise build_lib.ConfigError(f"config.asp.widths is only supported for the asp_* models, not "
                          f"{name!r}")


def make_policy(config):
  """ASP as the driver uses it (a library AutoStructured)."""
  a = lambda name, default: _field(config, f"asp.{name}", default)
  return auto_structured.auto_structured(
      k=float(a("k", 2.2)), tails=a("tails", "both"), max_patience=a("max_patience", 3),
      max_pruned_round=a("max_pruned_round", 50), reinit_on_prune=a("reinit_on_prune", True),
      rounds_between_prunes=a("rounds_between_prunes", 1))


def size_record(spec, num_clients: int) -> dict:
  """Params, FLOPs and whole-cohort bytes of one round for a dense model of `spec`."""
  up, down = accounting.round_bytes(spec, include_batch_stats=True)
  return {"params": accounting.param_count(spec), "flops": accounting.flops(spec),
          "bytes_up": up * num_clients, "bytes_down": down * num_clients}


def build(config, env: runtime.Env) -> runtime.Run:
  method_name = config.get("method", "asp")
  data = env.data
  dense_spec = build_spec(config, data)
  init_key = jax.random.key(config.seeds.init)
  params, batch_stats = models.init_params(dense_spec, init_key)
  policy = make_policy(config) if method_name == "asp" else None
  dense_sizes = size_record(dense_spec, config.clients_per_round)
  dense_per_round = dense_sizes["bytes_up"] + dense_sizes["bytes_down"]
  ratio = float(_field(config, "l1_filter.ratio", 0.5))
  prune_round = _field(config, "l1_filter.prune_round", 0)

  # A resumed run gets the checkpoint's strategy (runtime.choose_strategy).
  algorithm_for = lambda apply_fn, schedule: build_lib.build_algorithm(config, apply_fn, schedule)
  strategy, timings = runtime.choose_strategy(env, dense_spec, params, batch_stats,
                                              algorithm_for, runtime.cohort_for(env, 0))
  env.log(f"client execution: {strategy.name}")

  def apply_for(spec):
    return build_lib.build_apply(spec, data.normalize, strategy.conv_impl,
                                 build_lib.compute_dtype(config))

  def algorithm(spec):
    return build_lib.build_algorithm(config, apply_for(spec))

  def with_cache(state, **fields):
    return state._replace(cache={"sizes": size_record(state.spec, config.clients_per_round),
                                 "phase": "", "accepted": False, "search_rounds": 0,
                                 "rebuilds": 0, **fields})

  def init():
    search = policy.init() if policy is not None else auto_structured.AutoStructuredState(
        True, 0, 0, 0)  # for l1_filter: still_prune = not yet pruned
    server = algorithm(dense_spec).init(params, init_key, batch_stats=batch_stats)
    return with_cache(federated.MethodState(server, dense_spec,
                                            {"search": search._asdict(), "cum_bytes": 0}))

  def before_round(state, round_idx, key):
    search = auto_structured.AutoStructuredState(**state.host["search"])
    spec, accepted = state.spec, False
    if policy is not None:
      search, decision = policy.step(search, spec, jax.device_get(state.server.params),
                                     jax.device_get(state.server.batch_stats), round_idx, key)
      phase = "search" if search.still_prune else "train"  # the step may end phase 1
      if decision.accepted:
        accepted, spec = True, decision.spec
        new_params, new_stats = decision.params, decision.batch_stats
    else:
      phase = "dense" if search.still_prune else "train"
      if search.still_prune and round_idx >= prune_round:
        out = l1_filter.l1_filter_prune(spec, jax.device_get(state.server.params), ratio,
                                        batch_stats=jax.device_get(state.server.batch_stats))
        accepted, spec, new_params, new_stats = True, out.spec, out.params, out.batch_stats
        search = search._replace(still_prune=False, num_accepted=1, last_decision_round=round_idx)
    cache = state.cache
    state = state._replace(host={**state.host, "search": search._asdict()})
    if accepted:  # new shapes: the loop compiles the round once for them
      server = algorithm(spec).init(new_params, init_key, batch_stats=new_stats)
      state = with_cache(state._replace(server=server, spec=spec),
                         rebuilds=cache["rebuilds"] + 1, search_rounds=cache["search_rounds"])
      env.log(f"round {round_idx + 1}: architecture -> {structured.spec_to_json(spec)} "
              f"({state.cache['sizes']['params']:,} params)")
      cache = state.cache
    return state._replace(cache={**cache, "phase": phase, "accepted": accepted,
                                 "search_rounds": cache["search_rounds"] + (phase == "search")})

  def after_round(state, round_idx, metrics):
    sizes = state.cache["sizes"]
    cum = state.host["cum_bytes"] + sizes["bytes_up"] + sizes["bytes_down"]
    return state._replace(host={**state.host, "cum_bytes": cum})

  def record(before, after, round_idx, metrics):
    c = after.cache
    return {**c["sizes"], "phase": c["phase"], "accepted": int(c["accepted"]),
            "cum_bytes": after.host["cum_bytes"], "dense_cum_bytes": dense_per_round * (round_idx + 1)}

  def evaluator(spec):
    evaluate = runtime.make_evaluator(env, apply_for(spec))
    return lambda state, round_idx: evaluate(state.server.params, state.server.batch_stats)

  def template(initial, spec, host):
    p, b = jax.eval_shape(lambda: models.init_params(spec, jax.random.key(0)))
    return jax.eval_shape(lambda: algorithm(spec).init(p, jax.random.key(0), batch_stats=b))

  def summary(state, last_eval):
    sizes, cum_bytes = state.cache["sizes"], state.host["cum_bytes"]
    dense_cum = dense_per_round * config.rounds
    return {
        "dense_params": dense_sizes["params"], "dense_flops": dense_sizes["flops"],
        "params": sizes["params"], "flops": sizes["flops"],
        "params_reduction": 1 - sizes["params"] / dense_sizes["params"],
        "flops_reduction": 1 - sizes["flops"] / dense_sizes["flops"],
        "spec": structured.spec_to_json(state.spec),
        "num_accepted": state.host["search"]["num_accepted"],
        "search_rounds_this_run": state.cache["search_rounds"],
        "rebuilds_this_run": state.cache["rebuilds"],
        "cum_bytes": cum_bytes, "dense_cum_bytes": dense_cum,
        "communication_ratio": dense_cum / cum_bytes if cum_bytes else float("nan"),
        "bytes_per_round_final": sizes["bytes_up"] + sizes["bytes_down"],
        "bytes_per_round_dense": dense_per_round}

  method = federated.Method(init=init, algorithm=algorithm, evaluator=evaluator,
                            before_round=before_round, after_round=after_round, record=record,
                            summary=summary, template=template, resume=with_cache)
  return runtime.Run(method, strategy, timings, data.train, lambda r: runtime.cohort_for(env, r))
