"""Client-side structured pruning decisions: clients score and vote, the server tallies.

The decentralised variant the ASP paper leaves open (issue 28, item 5): instead of the
server scoring the global model's filters, each client scores the filters (conv output
channels, or any channel group) of its own local model, on its own data, and votes
keep / drop per filter with ASP's rule; the server only sees (optionally noised) vote
counts and keeps the filters a majority (or a chosen fraction) of the voters keep.

  client (in the round, jittable):  scores_F = filter_l1(kernel) or filter_taylor(kernel, grad)
                                    vote_F = boundary_vote(scores_F, k, tails)
  server (in the round):            counts_F = tally(votes_CxF, participating_C[, noise])
  server (between phases, host):    keep = keep_from_votes(counts, num_voters, threshold)
                                    structured.shrink(spec, params, keep)

`boundary_vote` is `auto_structured.boundary_keep` (keep mu - k sigma <= s [<= mu + k
sigma] of the layer's scores, at least the filter nearest the mean) in jnp, so a single
client voting on the server's model decides exactly what server-side ASP decides.

Privacy: a client's vote vector changes the count of each filter by at most 1, so the
L2 sensitivity of the count vector of one group is sqrt(F) (every filter's vote
flipped); over all groups sqrt(sum F). `tally(..., noise_stddev=z * sqrt(total F))`
with Gaussian noise (`federated.add_gaussian_noise`) is a Gaussian mechanism of noise
multiplier z on the votes, accounted like DP-FedAvg's updates (`federated.epsilon`,
composed with the update mechanism when both are released in one round).

In the round (`with_client_votes`): each client votes on the model it has just trained
(read back out of its update, so local training is untouched), the votes travel in
`ClientOutput.per_client` next to the update, and the server step tallies them
(`tally`, noised with a key folded from the server's) into the round's metrics
(`votes/<group>` [F], `voters` []). ASP (`auto_structured.auto_structured(client_votes=
...)`) keeps them between rounds and decides its next architecture from them
(`keep_from_votes`) instead of scoring the aggregated model.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune import models, structured
from fedjax_prune import tree as tree_lib
from fedjax_prune.federated import _keys
from fedjax_prune.federated._engine import ClientInfo, ClientOutput, FedAlgorithm
from fedjax_prune.federated._privacy import add_gaussian_noise
from fedjax_prune.federated._robust import SumsView
from fedjax_prune.types import Params, PRNGKey

TAILS = ('both', 'lower')
VOTES_STREAM = 0x707E  # folded into the server's key for the tally's noise


def filter_l1(kernel: jax.Array) -> jax.Array:
  """[F] per-filter L1 norm: sum of |kernel| over every axis but the last (the outputs)."""
  kernel = jnp.asarray(kernel)
  return jnp.sum(jnp.abs(kernel.astype(jnp.float32)).reshape(-1, kernel.shape[-1]), axis=0)


def filter_taylor(kernel: jax.Array, grad: jax.Array) -> jax.Array:
  """[F] first-order Taylor score |sum_i w_i g_i| of each filter (Molchanov et al. 2019):
  the loss change estimated for removing it, `grad` the client's loss gradient."""
  kernel, grad = jnp.asarray(kernel), jnp.asarray(grad)
  if kernel.shape != grad.shape:
    raise ValueError(f'kernel and grad must have one shape, got {kernel.shape} and {grad.shape}')
  prod = (kernel.astype(jnp.float32) * grad.astype(jnp.float32)).reshape(-1, kernel.shape[-1])
  return jnp.abs(jnp.sum(prod, axis=0))


def filter_group_l1(spec, params: Params) -> dict[str, jax.Array]:
  """{group: float32 [F]} `structured.group_l1` in jnp (jittable: a client scores its own
  model in the round): per channel group of a conv/dense model, the L1 norm of each output
  channel's filters summed over the group's producers (a ResNet stream's convs); per LSTM
  unit, attention head and FFN unit of a text model (`structured.text_group_l1`)."""
  if isinstance(spec, models.TEXT_SPECS):
    return structured.text_group_l1(spec, params, xp=jnp)
  scores = {}
  for grp in structured.groups(spec):
    total = jnp.zeros((grp.width,), jnp.float32)
    for producer in grp.producers:
      node = params
      for k in producer:
        node = node[k]
      total = total + filter_l1(node['kernel'])
    scores[grp.name] = total
  return scores


def _check_rule(k: float, tails: str) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, float)) or not k >= 0:
    raise ValueError(f'k must be a number >= 0 (the boundary in standard deviations), got {k!r}')
  if tails not in TAILS:
    raise ValueError(f'tails must be one of {TAILS}, got {tails!r}')


def boundary_vote(scores_F: jax.Array, k: float, tails: str = 'both') -> jax.Array:
  """[F] bool: ASP's keep rule on one client's scores of one layer (jittable).

  Keeps mu - k sigma <= s (and s <= mu + k sigma with tails='both'), mu and sigma the
  mean and population std of the F scores; when nothing is inside, the filter nearest
  the mean (`auto_structured.boundary_keep`).
  """
  _check_rule(k, tails)
  s = jnp.asarray(scores_F, jnp.float32)
  mu, sigma = jnp.mean(s), jnp.std(s)
  keep = s >= mu - k * sigma
  if tails == 'both':
    keep &= s <= mu + k * sigma
  nearest = jnp.arange(s.shape[0]) == jnp.argmin(jnp.abs(s - mu))
  return jnp.where(jnp.any(keep), keep, nearest)


def client_votes(scores: Mapping[str, jax.Array], k: float, tails: str = 'both') -> dict:
  """{group: [F] bool} one client's votes from its {group: [F]} scores."""
  return {name: boundary_vote(s, k, tails) for name, s in scores.items()}


def tally(votes_C: Mapping[str, jax.Array], participating_C: jax.Array, *,
          key: PRNGKey | None = None, noise_stddev: float = 0.0) -> dict:
  """{group: [F] float32} the keep votes of the participating clients, optionally noised.

  Args:
    votes_C: {group: [C, F] bool} each cohort slot's votes (stacked).
    participating_C: [C] bool, the clients that vote (padding clients never count).
    key: PRNG key for the noise (required when noise_stddev > 0).
    noise_stddev: std of the Gaussian noise added to every count (module docstring).

  Returns:
    {group: [F] float32} counts (+ N(0, noise_stddev^2) each).
  """
  if isinstance(noise_stddev, bool) or not isinstance(noise_stddev, (int, float)) or not (
      noise_stddev >= 0):
    raise ValueError(f'noise_stddev must be a number >= 0, got {noise_stddev!r}')
  part = jnp.asarray(participating_C, bool)
  counts = {name: jnp.sum(jnp.where(part[:, None], jnp.asarray(v, bool), False), axis=0
                          ).astype(jnp.float32) for name, v in votes_C.items()}
  if noise_stddev > 0:
    if key is None:
      raise ValueError('tally with noise_stddev > 0 needs a key')
    counts = add_gaussian_noise(counts, key, noise_stddev)
  return counts


def keep_from_votes(counts: Mapping[str, Any], num_voters: float, *,
                    threshold: float = 0.5) -> dict[str, np.ndarray]:
  """{group: int indices} of the filters kept: more than `threshold` of the voters keep them.

  Host side (between phases). 0.5 is a strict majority. A group whose filters all fall
  short keeps the one of most votes (lowest index on ties), as ASP keeps at least one.
  The result is what `structured.shrink(spec, params, keep)` takes.

  Args:
    counts: {group: [F]} keep counts (`tally`; noised ones may be fractional).
    num_voters: the number of clients that voted (public: e.g. clients per round).
    threshold: fraction in [0, 1).
  """
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
      0.0 <= threshold < 1.0):
    raise ValueError(f'threshold must be a number in [0, 1), got {threshold!r}')
  if isinstance(num_voters, bool) or not isinstance(num_voters, (int, float, np.integer)) or not (
      num_voters > 0):
    raise ValueError(f'num_voters must be > 0, got {num_voters!r}')
  keep = {}
  for name, c in counts.items():
    c = np.asarray(c, np.float64)
    kept = np.flatnonzero(c > threshold * float(num_voters))
    keep[name] = kept if kept.size else np.array([int(np.argmax(c))])
  return keep


class ClientVotes(NamedTuple):
  """One client's votes in `ClientOutput.per_client` (stacked [C, ...] by the engine).

  Attributes:
    votes: {group: [F] bool} keep votes on the client's trained model.
    voter: [] bool, the client trained this round (active, weight > 0): only voters count.
  """
  votes: dict
  voter: jax.Array


def with_client_votes(alg: FedAlgorithm, vote_fn: Callable[[Params], dict], view: SumsView, *,
                      noise_stddev: float = 0.0) -> FedAlgorithm:
  """`alg` whose clients also vote on their locally trained model, tallied by the server.

  Each client runs `alg.client_update` unchanged, reads its update u = w_server - w_client
  back out of its sums (`view.read`, e.g. `federated.fedavg_view()`), and votes
  `vote_fn(w_server - u)` on its trained model (equal to w_client up to float rounding:
  the sums hold weight * u). The votes go to the server in `per_client` (the update's
  sums are untouched); the server step is `alg`'s with the same key, so the model, its
  state and its metrics are exactly `alg`'s, plus `votes/<group>` ([F] float32, the
  `tally` of the voters' votes, + N(0, noise_stddev^2) per count with a key folded from the
  server's) and `voters` ([] float32, the number of voters; public, as the cohort is).

  Args:
    alg: the algorithm (a view must read its client's update; not an aggregator that
      rewrites it, such as DP clipping or compression: wrap those around the voting
      algorithm, `federated.with_aggregator(with_client_votes(alg, ...), aggregator,
      view)`).
    vote_fn: `vote_fn(params) -> {group: [F] bool}`, jittable (`boundary_vote` of
      `filter_group_l1` scores for ASP).
    view: where `alg` keeps a client's update in its sums.
    noise_stddev: std of the Gaussian noise on every count (module docstring: z * sqrt(sum F)
      is the Gaussian mechanism of noise multiplier z on one client's votes).

  Returns:
    The FedAlgorithm (same init and server state as `alg`).

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> from fedjax_prune.pruning import client_votes
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4))
    >>> vote_fn = lambda p: {'dense_0': client_votes.boundary_vote(
    ...     client_votes.filter_l1(p['dense_0']['kernel']), 1.0)}
    >>> voting = client_votes.with_client_votes(alg, vote_fn, federated.fedavg_view())
    >>> state, metrics = federated.make_round(voting)(
    ...     voting.init(params, jax.random.key(1)), data, federated.make_cohort([0, 1, 2]),
    ...     jax.random.key(2))
    >>> metrics['votes/dense_0'].shape, float(metrics['voters'])
    ((8,), 3.0)
  """
  if isinstance(noise_stddev, bool) or not isinstance(noise_stddev, (int, float)) or not (
      noise_stddev >= 0):
    raise ValueError(f'noise_stddev must be a number >= 0, got {noise_stddev!r}')

  def client_update(state, data, info: ClientInfo, key: PRNGKey) -> ClientOutput:
    out = alg.client_update(state, data, info, key)
    update, weight, _, _ = view.read(state, out.sums)
    votes = vote_fn(tree_lib.sub(state.params, update))
    voter = jnp.asarray(info.active, bool) & (weight > 0)
    return ClientOutput(out.sums, (out.per_client, ClientVotes(votes, voter)))

  def server_update(state, outputs: ClientOutput, key: PRNGKey):
    inner_per_client, cast = outputs.per_client
    new_state, metrics = alg.server_update(state, ClientOutput(outputs.sums, inner_per_client), key)
    counts = tally(cast.votes, cast.voter, key=_keys.fold_in(key, VOTES_STREAM),
                   noise_stddev=float(noise_stddev))
    metrics = {**metrics, **{f'votes/{name}': c for name, c in counts.items()},
               'voters': jnp.sum(cast.voter.astype(jnp.float32))}
    return new_state, metrics

  return FedAlgorithm(alg.init, client_update, server_update)


def tallies_from_metrics(metrics: Mapping[str, Any]) -> dict:
  """{group: [F] counts} of a round's metrics (`with_client_votes`'s `votes/<group>`)."""
  return {name[len('votes/'):]: v for name, v in metrics.items() if name.startswith('votes/')}
