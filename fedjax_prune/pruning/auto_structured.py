"""Automatic Structured Pruning (ASP) for federated learning, as its official code does it.

The server, at the start of a round and on the aggregated global model, scores
every filter of every prunable conv by its L1 norm, keeps per layer the
filters inside [mu - k sigma, mu + k sigma] of that layer's scores (population
std; option: lower tail only), at least one, and builds the candidate
architecture. The candidate is accepted only if it has fewer parameters; then
the model is rebuilt (re-initialised by default, as the code does, or with the
surviving weights, then pruning the lower tail only: keeping the weights while
removing the upper tail kills the network) and the round re-jitted once. Three consecutive rejected
candidates (patience) or passing `max_pruned_round` end the search (phase 1);
phase 2 is plain FedAvg on the found architecture. Everything here is
host-side, between rounds, on concrete arrays; the round itself stays
`federated.fedavg` + `federated.make_round`.

Prunable layers (the official code's `prunable_conv` layers): every conv of a plain CNN and of the
Inception-style model; in a ResNet the stem and the first conv of every block.
A ResNet stage's residual stream behind a projection shortcut is a separate
channel group in `structured`; in the paper's ResNet every block's stream has
the stem's width, so a stream group as wide as the stem keeps as many channels
as the stem (`couple_streams_to_stem`, default True), chosen by the group's
own L1 norm; other stream groups are scored by the rule. Dense layers are
never pruned.

Text models (inferred: the paper names attention-head importance as its next
step; no code exists): the same rule per group of `structured.groups(spec)`, i.e.
per LSTM layer over its units, per transformer block over its heads and over its
FFN units, each scored by `structured.group_l1` (= `text_group_l1`: L1 of a unit's
incoming kernels, the 4 gate columns of kernel and recurrent kernel for an LSTM
unit, the head's q/k/v columns for a head, the dense_0 column for an FFN unit);
the rebuild is `structured.shrink` (= `text_shrink`). At least one unit / head /
FFN unit stays per group (the rule's floor), so no block is removed whole. The
embedding, position embedding, LayerNorms and head are never pruned (as the CNNs'
dense layers).

Client votes (option, inferred: the paper leaves a decentralised decision open; issue 28):
with `client_votes=ClientVotes(threshold, noise_multiplier)` the search decision comes
from the clients instead of the server. In every round each client applies the same rule
(`client_votes.boundary_vote`, float32) to the L1 norms of its own locally trained model
(`client_votes.filter_group_l1`), inside the compiled round, and its keep votes (one bit
per filter) travel with its update; the server tallies them, optionally with Gaussian
noise (noise multiplier z: std z * sqrt(filters voted on), the Gaussian mechanism on one
client's votes). Before the next round the server keeps a filter when more than
`threshold` of the voters voted to keep it (at least the most voted filter per group);
a stream group coupled to the stem keeps as many channels as the stem, its most voted
ones (each client votes for the top-n of its own scores, n its own stem vote). The
candidate is then accepted or rejected and rebuilt exactly as on the server's scores.
With identical clients and no noise this is the server's decision (up to float
rounding). Text models vote the same way on their units and heads (the L1 norms of
`structured.text_group_l1`, in jnp).

Deviations, documented: clients get a fresh Adam state (the Keras code reuses one
compiled client model for the whole round, so Adam moments leak between clients);
the filter kept when the rule would keep none is the one whose score is nearest
the mean (the code only keeps the count, which is all that matters with
re-initialisation).

References:
  Nguyen, Le, Avila, "Automatic Structured Pruning for Efficient Architecture
  in Federated Learning", arXiv 2411.01759 (2024); code
  github.com/NguyenThaiVu/prune_fl_project.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import accounting, federated, models, structured
from fedjax_prune.pruning import client_votes as votes_lib
from fedjax_prune.types import BatchStats, Params, PRNGKey

TAILS = ('both', 'lower')


class AutoStructuredState(NamedTuple):
  """Host-side search state (Python scalars; JSON-able via `_asdict()`).

  Attributes:
    still_prune: False once phase 1 (the architecture search) has ended.
    patience: consecutive rejected candidates since the last acceptance.
    num_accepted: accepted prunes so far.
    last_decision_round: round of the last pruning decision (0 before any).
  """
  still_prune: bool
  patience: int
  num_accepted: int
  last_decision_round: int


class Decision(NamedTuple):
  """What `step` decided this round.

  Attributes:
    accepted: True if the architecture changed (rebuild the model and the round).
    spec: the architecture to train this round (new if accepted).
    params: its params (re-initialised or sliced if accepted, else unchanged).
    batch_stats: its BatchNorm statistics.
    keep: the candidate's kept filters per group (None if no candidate was made).
    candidate_params: parameter count of the candidate (None if none was made).
  """
  accepted: bool
  spec: Any
  params: Params
  batch_stats: BatchStats
  keep: Optional[dict]
  candidate_params: Optional[int]


class ClientVotes(NamedTuple):
  """ASP's decision by the clients' votes (module docstring, "Client votes").

  Attributes:
    threshold: a filter is kept when more than `threshold` of the voters keep it, in
      [0, 1); 0.5 is a strict majority.
    noise_multiplier: z >= 0; the tallies get N(0, (z sqrt(sum F))^2) noise each, sum F
      the filters voted on (0: exact counts).
  """
  threshold: float = 0.5
  noise_multiplier: float = 0.0


class Tally(NamedTuple):
  """The clients' tallied votes of one round (`client_votes.with_client_votes`'s metrics).

  Attributes:
    counts: {group: [F]} keep counts (noised ones may be fractional or negative).
    num_voters: how many clients voted.
  """
  counts: dict
  num_voters: float


class AutoStructured(NamedTuple):
  """ASP as host-side functions (see `auto_structured`), and the clients' vote."""
  init: Callable[[], AutoStructuredState]
  propose: Callable[[Any, Params], dict]
  step: Callable[..., tuple[AutoStructuredState, Decision]]
  client_votes: Optional[ClientVotes] = None
  vote: Optional[Callable[[Any], Callable[[Params], dict]]] = None
  keep_from_votes: Optional[Callable[[Any, Tally], dict]] = None


def prunable_groups(spec, *, couple_streams_to_stem: bool = True) -> tuple[list[str], dict[str, str]]:
  """Which channel groups ASP scores, and which follow another group's count.

  Returns:
    (scored group names, {follower group: leader group}). Dense groups are
    never included; a ResNet's stream groups behind projection shortcuts
    follow the stem group when `couple_streams_to_stem` and as wide as it.
    Text models (module docstring): every group of `structured.groups(spec)`,
    none following another.
  """
  if isinstance(spec, models.MLPSpec):
    raise ValueError('ASP prunes conv filters; an MLPSpec has none (dense layers are never pruned)')
  if isinstance(spec, models.TEXT_SPECS):  # every LSTM layer's units, every block's heads and FFN
    return [grp.name for grp in structured.groups(spec)], {}
  scored, follows = [], {}
  groups = structured.groups(spec)
  stem = groups[0]
  for grp in groups:
    if grp.kind != 'conv':
      continue
    is_stream = isinstance(spec, models.ResNetSpec) and grp.name.endswith('/conv2')
    if is_stream and couple_streams_to_stem and grp.width == stem.width:
      follows[grp.name] = stem.name
    else:
      scored.append(grp.name)
  return scored, follows


def boundary_keep(scores: np.ndarray, k: float, tails: str = 'both') -> np.ndarray:
  """Filters inside the mean +- k std boundary of one layer's scores (>= 1 kept).

  Args:
    scores: [F] per-filter L1 norms.
    k: the boundary width in population standard deviations (k >= 0).
    tails: 'both' (keep mu - k sigma <= s <= mu + k sigma, the code) or
      'lower' (keep s >= mu - k sigma).

  Returns:
    [F] bool; if nothing is inside, the filter nearest the mean.
  """
  scores = np.asarray(scores, np.float64)
  mu, sigma = scores.mean(), scores.std()
  keep = scores >= mu - k * sigma
  if tails == 'both':
    keep &= scores <= mu + k * sigma
  if not keep.any():
    keep[np.argmin(np.abs(scores - mu))] = True
  return keep


def top_keep(scores: np.ndarray, n: int) -> np.ndarray:
  """[F] bool keeping the `n` highest scores (ties: lower index first)."""
  keep = np.zeros(scores.shape[0], bool)
  keep[np.argsort(-scores, kind='stable')[:n]] = True
  return keep


def auto_structured(*, k: float = 2.2, tails: Optional[str] = None, max_patience: int = 3,
                    max_pruned_round: int = 50, reinit_on_prune: bool = True,
                    rounds_between_prunes: int = 1, couple_streams_to_stem: bool = True,
                    init_fn: Callable[[Any, PRNGKey], tuple[Params, BatchStats]] = models.init_params,
                    client_votes: Optional[ClientVotes] = None) -> AutoStructured:
  """Automatic structured pruning (module docstring), faithful defaults.

  Args:
    k: STD_THRESHOLD_PRUNE (2.2 FEMNIST CNN, 2.0 CelebA CNN/ResNet, 2.5 FEMNIST
      ResNet/Inception, 2.4 CelebA Inception).
    tails: 'both' (the code) or 'lower' (inferred: one summary of the paper speaks
      of filters below a bound); None (default) = 'both' with re-initialisation,
      'lower' when the surviving weights are kept. Keeping the weights with 'both' is
      refused: the upper tail holds the most active filters, and removing them round
      after round killed the network (on FEMNIST every kept channel of conv_1 was dead
      by round 9, so the model output its bias and the search froze: docs/results/asp.md).
    max_patience: MAX_PRUNE_PATIENCE, consecutive rejected candidates that end the search.
    max_pruned_round: MAX_PRUNED_ROUND; the search ends at the first round past it.
    reinit_on_prune: re-initialise the accepted architecture (the code) or keep
      the surviving filters' weights (inferred: the paper's text may describe this).
    rounds_between_prunes: rounds between pruning decisions (the code: 1; inferred
      option: whether the paper trains several rounds between prunes is not known).
    couple_streams_to_stem: ResNet stream groups keep the stem's count (`prunable_groups`).
    init_fn: `(spec, key) -> (params, batch_stats)` for re-initialisation.
    client_votes: None (the paper): the server scores the aggregated model; a
      `ClientVotes`: the clients vote in the round and the server decides from their
      tallies (module docstring; `asp` wires it into the round).

  Returns:
    AutoStructured(init, propose, step, client_votes, vote, keep_from_votes):
      * `init() -> AutoStructuredState`;
      * `propose(spec, params) -> keep` ({group name: bool [width]}) by the rule;
      * `step(state, spec, params, batch_stats, round_idx, key, votes=None) ->
        (state, Decision)`, called before training round `round_idx` on the aggregated
        model; `key` is used only to re-initialise an accepted architecture; with
        `client_votes`, `votes` is the previous round's `Tally` and the candidate is
        `keep_from_votes(spec, votes)` instead of `propose(spec, params)`;
      * `vote(spec) -> vote_fn(params) -> {group: [F] bool}`, one client's votes by the
        rule on its model (jittable; conv models);
      * `keep_from_votes(spec, tally) -> keep` ({group name: bool [width]}).

  Example:
    >>> import jax
    >>> from fedjax_prune import models
    >>> from fedjax_prune.pruning import auto_structured as asp_lib
    >>> asp = asp_lib.auto_structured(k=0.5)
    >>> spec = models.asp_femnist_cnn(widths=(8, 16))
    >>> params, stats = models.init_params(spec, jax.random.key(0))
    >>> state, d = asp.step(asp.init(), spec, params, stats, 1, jax.random.key(1))
    >>> d.accepted, d.spec.convs[0].features < 8
    (True, True)
  """
  if not (isinstance(k, (int, float)) and not isinstance(k, bool) and k >= 0):
    raise ValueError(f'k must be a number >= 0, got {k!r}')
  if tails is None:
    tails = 'both' if reinit_on_prune else 'lower'
  if tails not in TAILS:
    raise ValueError(f'tails must be one of {TAILS} or None, got {tails!r}')
  if tails == 'both' and not reinit_on_prune:
    raise ValueError("tails='both' with reinit_on_prune=False removes the filters of largest L1 "
                     "norm (the upper tail) and keeps training the rest, which killed the network "
                     "in practice; keep the weights with tails='lower' (the default then), or "
                     "re-initialise with reinit_on_prune=True")
  for name, value, lo in (('max_patience', max_patience, 1), ('max_pruned_round', max_pruned_round, 0),
                          ('rounds_between_prunes', rounds_between_prunes, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
      raise ValueError(f'{name} must be an int >= {lo}, got {value!r}')
  if client_votes is not None:
    if not isinstance(client_votes, ClientVotes):
      raise ValueError(f'client_votes must be a ClientVotes or None, got {client_votes!r}')
    threshold, z = client_votes
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
        0 <= threshold < 1):
      raise ValueError(f'client_votes.threshold must be a number in [0, 1), got {threshold!r}')
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
      raise ValueError(f'client_votes.noise_multiplier must be a number >= 0, got {z!r}')

  def init() -> AutoStructuredState:
    return AutoStructuredState(True, 0, 0, 0)

  def propose(spec, params: Params) -> dict:
    scored, follows = prunable_groups(spec, couple_streams_to_stem=couple_streams_to_stem)
    scores = structured.group_l1(spec, params)
    keep = {name: boundary_keep(scores[name], k, tails) for name in scored}
    for follower, leader in follows.items():
      keep[follower] = top_keep(scores[follower], int(keep[leader].sum()))
    return keep

  def vote(spec) -> Callable[[Params], dict]:
    scored, follows = prunable_groups(spec, couple_streams_to_stem=couple_streams_to_stem)

    def vote_fn(params: Params) -> dict:
      scores = votes_lib.filter_group_l1(spec, params)
      votes = {name: votes_lib.boundary_vote(scores[name], k, tails) for name in scored}
      for follower, leader in follows.items():  # `top_keep` of the leader's count, in jnp
        rank = jnp.argsort(jnp.argsort(-scores[follower], stable=True), stable=True)
        votes[follower] = rank < jnp.sum(votes[leader])
      return votes

    return vote_fn

  def keep_from_votes(spec, votes: Tally) -> dict:
    scored, follows = prunable_groups(spec, couple_streams_to_stem=couple_streams_to_stem)
    widths = {grp.name: grp.width for grp in structured.groups(spec)}
    counts = {name: np.asarray(votes.counts.get(name, ()), np.float64)
              for name in scored + list(follows)}
    for name in counts:
      if counts[name].shape != (widths[name],):
        raise ValueError(f'the tally of group {name!r} has shape {counts[name].shape}, the '
                         f'architecture has {widths[name]} channels there: votes of another '
                         'architecture?')
    threshold = 0.5 if client_votes is None else client_votes.threshold
    kept = votes_lib.keep_from_votes({name: counts[name] for name in scored}, votes.num_voters,
                                     threshold=threshold)
    keep = {}
    for name in scored:
      keep[name] = np.zeros(widths[name], bool)
      keep[name][kept[name]] = True
    for follower, leader in follows.items():
      keep[follower] = top_keep(counts[follower], int(keep[leader].sum()))
    return keep

  def step(state: AutoStructuredState, spec, params: Params, batch_stats: BatchStats,
           round_idx: int, key: PRNGKey, votes: Optional[Tally] = None
           ) -> tuple[AutoStructuredState, Decision]:
    unchanged = Decision(False, spec, params, batch_stats, None, None)
    if not state.still_prune:
      return state, unchanged
    if round_idx > max_pruned_round:  # hard stop of phase 1
      return state._replace(still_prune=False), unchanged
    if round_idx <= 0 or round_idx - state.last_decision_round < rounds_between_prunes:
      return state, unchanged  # never before the first aggregation
    if client_votes is None:
      keep = propose(spec, params)
    elif votes is None:
      raise ValueError(f'ASP with client votes decides before round {round_idx} from the '
                       'previous round\'s tallies, and none were given (votes=None)')
    else:
      keep = keep_from_votes(spec, votes)
    candidate = structured.shrink(spec, params, keep, batch_stats=batch_stats)
    count = accounting.param_count(candidate.spec)
    if count < accounting.param_count(spec):
      if reinit_on_prune:
        new_params, new_stats = init_fn(candidate.spec, key)
      else:
        new_params, new_stats = candidate.params, candidate.batch_stats
      new_state = AutoStructuredState(True, 0, state.num_accepted + 1, round_idx)
      return new_state, Decision(True, candidate.spec, new_params, new_stats, keep, count)
    patience = state.patience + 1
    new_state = AutoStructuredState(patience < max_patience, patience, state.num_accepted, round_idx)
    return new_state, Decision(False, spec, params, batch_stats, keep, count)

  return AutoStructured(init, propose, step, client_votes, vote, keep_from_votes)


# A between-rounds decision: (search state, spec, params, batch_stats, round_idx, key)
# -> (search state, phase label of the round, Decision); with client votes also the
# keyword `votes` (the previous round's `Tally`, or None).
DecideFn = Callable[[AutoStructuredState, Any, Params, BatchStats, int, PRNGKey],
                    tuple[AutoStructuredState, str, Decision]]


def round_sizes(spec, clients_per_round: int) -> dict:
  """Params, FLOPs (batch 1) and whole-cohort bytes of one round of dense FedAvg on `spec`
  (float32 model with its BatchNorm statistics, both ways)."""
  up, down = accounting.round_bytes(spec, include_batch_stats=True)
  return {"params": accounting.param_count(spec), "flops": accounting.flops(spec),
          "bytes_up": up * clients_per_round, "bytes_down": down * clients_per_round}


def rebuilding_fedavg(decide: DecideFn, initial_search: AutoStructuredState, *, spec,
                      params: Params, batch_stats: BatchStats, key: PRNGKey,
                      fedavg_for: Callable[[Any], federated.FedAlgorithm],
                      model: federated.ModelFns, clients_per_round: int,
                      probe_x: Optional[Any] = None,
                      log: Callable[[str], None] = federated.no_log,
                      client_vote: Optional[Callable[[Any], Callable[[Params], dict]]] = None,
                      vote_noise_multiplier: float = 0.0,
                      update_aggregator: Optional[federated.Aggregator] = None
                      ) -> federated.Method:
  """FedAvg whose architecture a host-side rule shrinks between rounds (ASP, L1 filter).

  Before every round, `decide` looks at the aggregated model; an accepted decision's
  smaller architecture (its params re-initialised or sliced by the rule) gets a fresh
  FedAvg server state, and the round is compiled once for its shapes.

  Args:
    decide: the rule (`asp`'s search step, `l1_filter`'s one-shot prune).
    initial_search: its starting state.
    spec, params, batch_stats: the dense starting model.
    key: the init key (server states of rebuilt models are initialised with it).
    fedavg_for: `fedavg_for(apply_fn) -> FedAlgorithm`, the FedAvg-family algorithm.
    model: apply function and evaluation per architecture.
    clients_per_round: for the records' whole-cohort bytes.
    probe_x: optional [B, ...] batch of training inputs: each record then carries the
      dead-channel diagnostic of the round's model on it (`structured.channel_activity`:
      `active_channels`, `active_channels_min`). A search that kills channels (they get
      no gradient, their L1 norms freeze) shows there first.
    log: receives one line per rebuild.
    client_vote: optional `client_vote(spec) -> vote_fn(params) -> {group: [F] bool}`: every
      round's clients vote on their trained models inside the compiled round
      (`client_votes.with_client_votes` over `federated.fedavg_view()`: the FedAvg family
      with its default mean), the tallies are kept in `host['votes']` while the search runs
      (checkpointed) and `decide` gets the last round's as `votes=Tally(...)`. The votes'
      bits are part of `bytes_up` (ceil(filters voted on / 8) per client), in every round
      (the compiled round votes after the search too; its tallies are then unused).
    vote_noise_multiplier: z, the tallies' noise std is z * sqrt(filters voted on).
    update_aggregator: with `client_vote` only: the aggregator of the clients' updates
      (DP, compression, robust statistics; `federated.with_aggregator` over
      `federated.fedavg_view()` around the voting algorithm), its state in
      `ServerState.aggregator`. `fedavg_for` then gives the plain-mean algorithm: a
      client votes on the model it trained, before its update is clipped, noised or
      compressed (an aggregator in `fedavg_for`'s path would hand the voter its
      rewritten update). With compression the votes' bits are `vote_bytes_up` in the
      records, for the measured upload to add.

  Returns:
    The `Method`. Records: `params`, `flops`, `bytes_up`/`bytes_down` of the round,
    `phase` (the rule's label), `accepted` (1 when the architecture changed before
    this round), `cum_bytes` and `dense_cum_bytes` (the same for dense FedAvg), and with
    `probe_x` the channel activity; with `client_vote` the round's tallies `votes/<group>`
    ([F] lists) and `voters`.
  """
  if update_aggregator is not None and client_vote is None:
    raise ValueError("update_aggregator is for voting clients (client_vote=...); without "
                     "votes give the aggregator to fedavg_for's algorithm")
  dense_sizes = round_sizes(spec, clients_per_round)
  activity_of = {}  # one compiled diagnostic per architecture
  dense_per_round = dense_sizes["bytes_up"] + dense_sizes["bytes_down"]

  def vote_widths(spec) -> dict:
    p, _ = jax.eval_shape(lambda: models.init_params(spec, jax.random.key(0)))
    return {name: v.shape[0] for name, v in jax.eval_shape(client_vote(spec), p).items()}

  def algorithm(spec):
    alg = fedavg_for(model.apply_for(spec))
    if client_vote is None:
      return alg
    stddev = vote_noise_multiplier * float(np.sqrt(sum(vote_widths(spec).values())))
    voting = votes_lib.with_client_votes(alg, client_vote(spec), federated.fedavg_view(),
                                         noise_stddev=stddev)
    if update_aggregator is None:
      return voting
    return federated.with_aggregator(voting, update_aggregator, federated.fedavg_view())

  def sizes_of(spec) -> dict:
    sizes = round_sizes(spec, clients_per_round)
    if client_vote is not None:  # one bit per filter voted on, per client
      sizes["vote_bytes_up"] = -(-sum(vote_widths(spec).values()) // 8) * clients_per_round
      sizes["bytes_up"] += sizes["vote_bytes_up"]
    return sizes

  def with_cache(state, **fields):
    return state._replace(cache={"sizes": sizes_of(state.spec),
                                 "phase": "", "accepted": False, "search_rounds": 0,
                                 "rebuilds": 0, "keep": None, **fields})

  def init():
    server = algorithm(spec).init(params, key, batch_stats=batch_stats)
    host = {"search": initial_search._asdict(), "cum_bytes": 0, "dense_cum_bytes": 0}
    if client_vote is not None:
      host["votes"] = None  # no round has voted yet
    return with_cache(federated.MethodState(server, spec, host))

  def before_round(state, round_idx, round_key):
    search = AutoStructuredState(**state.host["search"])
    extra = {}
    if client_vote is not None:  # the previous round's tallies, on this architecture
      held = state.host.get("votes")
      extra["votes"] = None if held is None else Tally(held["counts"], held["voters"])
    search, phase, decision = decide(search, state.spec, jax.device_get(state.server.params),
                                     jax.device_get(state.server.batch_stats), round_idx, round_key,
                                     **extra)
    cache = state.cache
    state = state._replace(host={**state.host, "search": search._asdict()})
    if decision.accepted:  # new shapes: the experiment loop compiles the round once for them
      server = algorithm(decision.spec).init(decision.params, key, batch_stats=decision.batch_stats)
      # `keep`: the filters the rebuild kept of the previous architecture, per group
      # (`structured.keep_masks(previous spec, keep)` is the equivalent mask).
      state = with_cache(state._replace(server=server, spec=decision.spec),
                         rebuilds=cache["rebuilds"] + 1, search_rounds=cache["search_rounds"],
                         keep=decision.keep)
      log(f"round {round_idx + 1}: architecture -> {structured.spec_to_json(decision.spec)} "
          f"({state.cache['sizes']['params']:,} params)")
      cache = state.cache
    return state._replace(cache={**cache, "phase": phase, "accepted": decision.accepted,
                                 "search_rounds": cache["search_rounds"] + (phase == "search")})

  def after_round(state, round_idx, metrics):
    sizes = state.cache["sizes"]
    cum = state.host["cum_bytes"] + sizes["bytes_up"] + sizes["bytes_down"]
    dense_cum = state.host["dense_cum_bytes"] + dense_per_round
    host = {**state.host, "cum_bytes": cum, "dense_cum_bytes": dense_cum}
    if client_vote is not None:  # decide the next round from them, while the search runs
      host["votes"] = ({"counts": votes_lib.tallies_from_metrics(metrics),
                        "voters": metrics["voters"]} if host["search"]["still_prune"] else None)
    return state._replace(host=host)

  def channel_record(state) -> dict:
    if probe_x is None:
      return {}
    name = repr(state.spec)
    if name not in activity_of:
      activity_of[name] = structured.channel_activity(model.apply_for(state.spec))
    s = state.server
    activity = activity_of[name](s.params, s.batch_stats, probe_x, jax.random.key(0))
    return structured.activity_summary(activity, s.params)

  def record(before, after, round_idx, metrics):
    c = after.cache
    return {**c["sizes"], "phase": c["phase"], "accepted": int(c["accepted"]),
            "cum_bytes": after.host["cum_bytes"],
            "dense_cum_bytes": after.host["dense_cum_bytes"], **channel_record(after)}

  def evaluator(spec):
    evaluate = model.evaluate_with(model.apply_for(spec))
    return lambda state, round_idx: evaluate(state.server.params, state.server.batch_stats)

  def template(initial, spec, host):
    del initial, host
    p, b = jax.eval_shape(lambda: models.init_params(spec, jax.random.key(0)))
    return jax.eval_shape(lambda: algorithm(spec).init(p, jax.random.key(0), batch_stats=b))

  def summary(state, last_eval):
    del last_eval
    sizes, cum_bytes = state.cache["sizes"], state.host["cum_bytes"]
    dense_cum = state.host["dense_cum_bytes"]
    return {
        "dense_params": dense_sizes["params"], "dense_flops": dense_sizes["flops"],
        "params": sizes["params"], "flops": sizes["flops"],
        "params_reduction": 1 - sizes["params"] / dense_sizes["params"],
        "flops_reduction": 1 - sizes["flops"] / dense_sizes["flops"],
        "spec": structured.spec_to_json(state.spec),
        "num_accepted": state.host["search"]["num_accepted"],
        "search_rounds_this_run": state.cache["search_rounds"],
        "rebuilds_this_run": state.cache["rebuilds"], "cum_bytes": cum_bytes,
        "dense_cum_bytes": dense_cum,
        "communication_ratio": dense_cum / cum_bytes if cum_bytes else float("nan"),
        "bytes_per_round_final": sizes["bytes_up"] + sizes["bytes_down"],
        "bytes_per_round_dense": dense_per_round}

  return federated.Method(init=init, algorithm=algorithm, evaluator=evaluator,
                          before_round=before_round, after_round=after_round, record=record,
                          summary=summary, template=template, resume=with_cache)


def asp(policy: AutoStructured, **kwargs) -> federated.Method:
  """ASP end to end: FedAvg whose architecture `policy`'s search shrinks before rounds.

  Phase 1 ('search' rounds): before each round the search step scores the
  aggregated model's filters and may accept a smaller architecture (rebuilt,
  re-initialised by default); phase 2 ('train' rounds): FedAvg on the found one.

  With `policy.client_votes` the decision is the clients' (module docstring): every
  round's clients vote in the compiled round (`rebuilding_fedavg(client_vote=policy.vote)`)
  and the search step decides from the last round's tallies.

  Args:
    policy: `auto_structured(...)`, the search rule and its options.
    **kwargs: `rebuilding_fedavg`'s keyword arguments (spec, params, batch_stats, key,
      fedavg_for, model, clients_per_round, log).
  """

  def decide(search, spec, params, batch_stats, round_idx, key, votes=None):
    search, decision = policy.step(search, spec, params, batch_stats, round_idx, key, votes=votes)
    return search, ("search" if search.still_prune else "train"), decision  # may end phase 1

  if policy.client_votes is not None:
    policy.vote(kwargs["spec"])  # refuses a text model now, not at the first round
    kwargs = {**kwargs, "client_vote": policy.vote,
              "vote_noise_multiplier": float(policy.client_votes.noise_multiplier)}
  return rebuilding_fedavg(decide, policy.init(), **kwargs)
