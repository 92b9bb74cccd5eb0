"""DP-FedAvg: per-client clipping, Gaussian noise on the sum, adaptive clipping, accounting.

The pieces plug into the engine's aggregation hook as a client-side contribution
and a server-side finish (the `_aggregate` convention):

  client:  `dp_contribution(update, present, clip_state)` -> `DPSums` (summed over the cohort)
  server:  `finish_dp_mean(clip_state, sums, key, config, released)` -> (clip_state', mean)

and each step is also exposed on its own (`clip_update`, `add_gaussian_noise`,
`update_clip_norm`).

**Clipping over released coordinates.** A client releases only the
coordinates it holds (`present`: its pruning mask or submodel). Its update is
clipped to L2 norm `C` over those coordinates, and the others are sent as
exact zeros. Whatever set a client releases, its contribution to the sum has
L2 norm <= C, so the sum's L2 sensitivity (add/remove one client) is C on every
coordinate set, masks or not.

**Noise on released coordinates (a documented choice).** Gaussian noise
N(0, (z C)^2) goes on every coordinate that any client *may* release: the
`released` tree, which must be public and chosen before the round's data is
seen. Use the server's current mask (clients can release nothing outside it,
so the sum is exactly 0 there and needs no noise; that set is public because
the server broadcast it). Coordinates outside `released` get no noise and stay
exactly as the server had them. Do not pass the union of *this round's* client
masks when those masks depend on client data (FIARSE's touched coordinates, a
client-side pruning vote): where noise goes would then leak which coordinates a
client held. Pass all-True (`released=True`) when in doubt.

**Fixed denominator.** The mean is (sum + noise) / m with m the *expected*
number of clients per round (public, fixed by the config), as in DP-FedAvg's
fixed-denominator estimator; the actual number of participating clients is not
used, because under Poisson sampling it is itself private. Clients are weighted
uniformly (weight 1 each, not by example count): example-count weights would
change the sensitivity. Per-coordinate counts (submodel averaging) may be used
as the denominator only when they are public (derived from the server's masks
and public client capacities): pass them as `denominator`.

**Adaptive clipping** (Andrew et al. 2021): each client also contributes
b_i - 1/2 with b_i = 1[||update_i|| <= C] (centring halves the sensitivity of
the count to 1/2); the server forms the noised fraction
  b = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / m + 1/2, clipped to [0, 1],
and moves the clip norm geometrically, C <- C exp(-eta (b - gamma)), towards the
gamma-quantile of the update norms. The two Gaussian queries compose into one
with noise multiplier z = (z_update^-2 + (2 sigma_b)^-2)^-1/2, so for a target
accounting multiplier z the updates get z_update = (z^-2 - (2 sigma_b)^-2)^-1/2
(`update_noise_multiplier`; requires 2 sigma_b > z), as TF Federated does.

**Accounting.** `epsilon` and `epsilon_per_round` use the `dp_accounting`
library's RDP accountant (or its PLD accountant) on a Poisson-sampled Gaussian
mechanism with sampling probability q = m / num_clients, composed over the
rounds. The engine samples a fixed-size cohort without replacement; the
Poisson accountant is the standard approximation for it (DP-FedAvg, TF
Federated).

References:
  McMahan et al., Learning Differentially Private Recurrent Language Models,
  ICLR 2018. Andrew et al., Differentially Private Learning with Adaptive
  Clipping, NeurIPS 2021. Mironov, Renyi Differential Privacy, CSF 2017.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.masks._filters import tree_like
from fedjax_prune.types import PRNGKey, PyTree

ACCOUNTANTS = ('rdp', 'pld')


# ----------------------------------------------------------------------------
# Configuration and validation.


def _number(value: Any, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f'{name} must be a number, got {value!r}')
  value = float(value)
  if math.isnan(value):
    raise ValueError(f'{name} must not be NaN')
  return value


def check_dp(*, noise_multiplier: Any = None, clip_norm: Any = None, delta: Any = None,
             target_quantile: Any = None, clip_learning_rate: Any = None,
             count_stddev: Any = None, expected_clients: Any = None,
             sampling_probability: Any = None, rounds: Any = None) -> None:
  """Validates the DP arguments that are given (None skips one); raises ValueError naming it.

  Ranges: noise_multiplier >= 0 (finite), clip_norm > 0 (finite), delta in (0, 1),
  target_quantile in [0, 1], clip_learning_rate >= 0, count_stddev >= 0,
  expected_clients > 0, sampling_probability in (0, 1], rounds an int >= 0.
  """
  if noise_multiplier is not None:
    z = _number(noise_multiplier, 'noise_multiplier')
    if not 0.0 <= z < math.inf:
      raise ValueError(f'noise_multiplier must be >= 0 and finite, got {z}')
  if clip_norm is not None:
    c = _number(clip_norm, 'clip_norm')
    if not 0.0 < c < math.inf:
      raise ValueError(f'clip_norm must be > 0 and finite, got {c}')
  if delta is not None:
    d = _number(delta, 'delta')
    if not 0.0 < d < 1.0:
      raise ValueError(f'delta must be in (0, 1), got {d}')
  if target_quantile is not None:
    g = _number(target_quantile, 'target_quantile')
    if not 0.0 <= g <= 1.0:
      raise ValueError(f'target_quantile must be in [0, 1], got {g}')
  if clip_learning_rate is not None:
    eta = _number(clip_learning_rate, 'clip_learning_rate')
    if not 0.0 <= eta < math.inf:
      raise ValueError(f'clip_learning_rate must be >= 0 and finite, got {eta}')
  if count_stddev is not None:
    s = _number(count_stddev, 'count_stddev')
    if not 0.0 <= s < math.inf:
      raise ValueError(f'count_stddev must be >= 0 and finite, got {s}')
  if expected_clients is not None:
    m = _number(expected_clients, 'expected_clients')
    if not 0.0 < m < math.inf:
      raise ValueError(f'expected_clients must be > 0 and finite, got {m}')
  if sampling_probability is not None:
    q = _number(sampling_probability, 'sampling_probability')
    if not 0.0 < q <= 1.0:
      raise ValueError(f'sampling_probability must be in (0, 1], got {q}')
  if rounds is not None:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 0:
      raise ValueError(f'rounds must be an int >= 0, got {rounds!r}')


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=['noise_multiplier', 'clip_norm', 'expected_clients',
                                'target_quantile', 'clip_learning_rate', 'count_stddev'])
@dataclasses.dataclass(frozen=True)
class DPConfig:
  """DP-FedAvg settings (build with `dp_config`, which validates).

  A frozen dataclass whose fields are all static pytree metadata: it can be
  passed through `jax.jit` / `vmap` as an ordinary argument and stays Python
  numbers there (a change recompiles).

  Attributes:
    noise_multiplier: z, the accounting noise multiplier (the combined one under
      adaptive clipping; see `update_noise_multiplier`). 0 disables the noise.
    clip_norm: C, the clip norm (its initial value under adaptive clipping).
    expected_clients: m, the expected number of clients per round: the fixed
      denominator of the mean.
    target_quantile: gamma for adaptive clipping; None keeps C fixed.
    clip_learning_rate: eta of the geometric clip-norm update (0.2 in Andrew et al.).
    count_stddev: sigma_b, the std of the noise on the count of unclipped clients
      (absolute, in clients).
  """
  noise_multiplier: float
  clip_norm: float
  expected_clients: float
  target_quantile: Optional[float] = None
  clip_learning_rate: float = 0.2
  count_stddev: float = 0.0


def dp_config(*, noise_multiplier: float, clip_norm: float, expected_clients: float,
              target_quantile: Optional[float] = None, clip_learning_rate: float = 0.2,
              count_stddev: Optional[float] = None) -> DPConfig:
  """Validated `DPConfig`; count_stddev defaults to m / 20 under adaptive clipping.

  The default sigma_b = 0.05 m is Andrew et al.'s (and TF Federated's). Raises
  ValueError naming the field when a value is out of range, or when adaptive
  clipping with noise has 2 sigma_b <= z (then no update noise multiplier gives
  the combined z).

  Example:
    >>> cfg = dp_config(noise_multiplier=1.0, clip_norm=0.5, expected_clients=100,
    ...                 target_quantile=0.5)
    >>> cfg.count_stddev
    5.0
  """
  check_dp(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
           expected_clients=expected_clients, target_quantile=target_quantile,
           clip_learning_rate=clip_learning_rate, count_stddev=count_stddev)
  if count_stddev is None:
    count_stddev = 0.05 * float(expected_clients) if target_quantile is not None else 0.0
  config = DPConfig(float(noise_multiplier), float(clip_norm), float(expected_clients),
                    None if target_quantile is None else float(target_quantile),
                    float(clip_learning_rate), float(count_stddev))
  if config.target_quantile is not None:
    update_noise_multiplier(config.noise_multiplier, config.count_stddev)  # raises if impossible
  return config


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
  """Noise multiplier for the update sum under adaptive clipping.

  z_update = (z^-2 - (2 sigma_b)^-2)^-1/2 (Andrew et al. 2021, Thm. 1): the
  update query and the count query (sensitivity 1/2, multiplier 2 sigma_b)
  together are a Gaussian query of multiplier z. z = 0 gives 0 (no noise).

  Args:
    noise_multiplier: z, the combined (accounting) multiplier.
    count_stddev: sigma_b, the std of the noise on the count of unclipped clients.

  Returns:
    z_update >= z, a Python float.
  """
  check_dp(noise_multiplier=noise_multiplier, count_stddev=count_stddev)
  z, s = float(noise_multiplier), float(count_stddev)
  if z == 0.0:
    return 0.0
  if 2.0 * s <= z:
    raise ValueError(
        f'count_stddev must exceed noise_multiplier / 2 = {z / 2} for adaptive clipping '
        f'with noise_multiplier {z}, got {s}')
  return (z ** -2 - (2.0 * s) ** -2) ** -0.5


def combined_noise_multiplier(update_multiplier: float, count_stddev: float) -> float:
  """The accounting multiplier z = (z_update^-2 + (2 sigma_b)^-2)^-1/2 (inverse of the above).

  sigma_b = 0 (no count noise) would release the count exactly: raises, since no
  finite guarantee holds then unless z_update is 0 too (returned as 0: non-private).
  """
  check_dp(noise_multiplier=update_multiplier, count_stddev=count_stddev)
  zu, s = float(update_multiplier), float(count_stddev)
  if zu == 0.0:
    return 0.0
  if s == 0.0:
    raise ValueError('count_stddev must be > 0 when the clip norm adapts with noisy updates')
  return (zu ** -2 + (2.0 * s) ** -2) ** -0.5


# ----------------------------------------------------------------------------
# Client side.


def clip_update(update: PyTree, present: Any, clip_norm: jax.typing.ArrayLike
                ) -> tuple[PyTree, jax.Array]:
  """Clips one client's update to L2 norm `clip_norm` over its released coordinates.

  Args:
    update: the client's update, float leaves of any shape.
    present: bool tree (or one bool) broadcastable to `update`: the coordinates
      the client holds and releases (its mask / submodel).
    clip_norm: [] C > 0 (may be traced: the adaptive clip norm).

  Returns:
    (clipped, was_clipped): `clipped` is `update` scaled by min(1, C / ||u||)
    on present coordinates and exactly 0 elsewhere (||u|| the norm over present
    coordinates); `was_clipped` is [] bool, ||u|| > C.
  """
  present = tree_like(present, update, 'present')
  released = jax.tree.map(lambda x, p: jnp.where(p, x, jnp.zeros((), x.dtype)), update, present)
  sq = sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(released)),
           jnp.zeros((), jnp.float32))
  norm = jnp.sqrt(sq)
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  was_clipped = norm > clip_norm
  factor = jnp.where(was_clipped, clip_norm / jnp.where(was_clipped, norm, 1.0), 1.0)
  clipped = jax.tree.map(lambda x: x * factor.astype(x.dtype), released)
  return clipped, was_clipped


def quantile_contribution(was_clipped: jax.typing.ArrayLike) -> jax.Array:
  """[] float32 b_i - 1/2: +1/2 for an unclipped client, -1/2 for a clipped one.

  Centring the indicator at 0 makes the sensitivity of its sum 1/2 (Andrew et
  al. 2021). The engine multiplies it by the participation weight (0 for a
  padding client) like any other contribution.
  """
  return 0.5 - jnp.asarray(was_clipped).astype(jnp.float32)


class ClipState(NamedTuple):
  """Server state of DP-FedAvg: the current clip norm C ([] float32)."""
  clip_norm: jax.Array


def init_clip_state(config: DPConfig) -> ClipState:
  return ClipState(clip_norm=jnp.asarray(config.clip_norm, jnp.float32))


class DPSums(NamedTuple):
  """What one client contributes (and the cohort sums): the clipped update and b_i - 1/2."""
  update: PyTree
  below: jax.Array


def dp_contribution(update: PyTree, present: Any, state: ClipState) -> DPSums:
  """Client side of DP-FedAvg: clip to the current C over the released coordinates.

  Args:
    update: the client's update.
    present: bool tree broadcastable to `update` (see `clip_update`).
    state: the server's `ClipState` (broadcast to the clients).

  Returns:
    DPSums(update=clipped update, below=b_i - 1/2). Padding clients must
    contribute zeros (the engine's weight), as for every contribution.
  """
  clipped, was_clipped = clip_update(update, present, state.clip_norm)
  return DPSums(clipped, quantile_contribution(was_clipped))


# ----------------------------------------------------------------------------
# Server side.


def add_gaussian_noise(total: PyTree, key: PRNGKey, stddev: jax.typing.ArrayLike,
                       released: Any = True) -> PyTree:
  """total + N(0, stddev^2) on every released coordinate (no noise elsewhere).

  Args:
    total: the sum of the clipped client updates.
    key: PRNG key (used once; one subkey per leaf).
    stddev: [] noise std, z * C for DP-FedAvg.
    released: public bool tree (or one bool) broadcastable to `total`: the
      coordinates any client may release, e.g. the server's current mask.

  Returns:
    A tree like `total`.
  """
  released = tree_like(released, total, 'released')
  leaves, treedef = jax.tree.flatten(total)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(key, max(len(leaves), 1))[:len(leaves)]))
  stddev = jnp.asarray(stddev, jnp.float32)

  def noisy(x, k, r):
    noise = jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) * stddev.astype(x.dtype)
    return x + jnp.where(r, noise, jnp.zeros((), x.dtype))

  return jax.tree.map(noisy, total, keys, released)


def update_clip_norm(state: ClipState, below_sum: jax.typing.ArrayLike, key: PRNGKey, *,
                     target_quantile: float, clip_learning_rate: float, count_stddev: float,
                     expected_clients: float) -> ClipState:
  """Geometric clip-norm update of Andrew et al. (2021) from the noised unclipped fraction.

  b = clip((below_sum + N(0, count_stddev^2)) / expected_clients + 1/2, 0, 1);
  C' = C exp(-clip_learning_rate (b - target_quantile)).

  Args:
    state: the current `ClipState`.
    below_sum: [] sum over the cohort of `quantile_contribution` (b_i - 1/2).
    key: PRNG key for the count noise (used once).
    target_quantile: gamma in [0, 1].
    clip_learning_rate: eta >= 0.
    count_stddev: sigma_b >= 0.
    expected_clients: m > 0, the fixed denominator.

  Returns:
    The new `ClipState`.
  """
  noise = jax.random.normal(key, (), jnp.float32) * jnp.float32(count_stddev)
  below = (jnp.asarray(below_sum, jnp.float32) + noise) / jnp.float32(expected_clients) + 0.5
  below = jnp.clip(below, 0.0, 1.0)  # a noised fraction may leave [0, 1] (TF Privacy clips too)
  step = jnp.float32(clip_learning_rate) * (below - jnp.float32(target_quantile))
  return ClipState(clip_norm=state.clip_norm * jnp.exp(-step))


def finish_dp_mean(state: ClipState, sums: DPSums, key: PRNGKey, config: DPConfig,
                   released: Any = True, denominator: Any = None) -> tuple[ClipState, PyTree]:
  """Server side of DP-FedAvg: noised sum over a fixed denominator, then the clip-norm update.

  The noise std is z_update * C with C the clip norm the clients used this
  round (z_update = z under fixed clipping, `update_noise_multiplier` under
  adaptive clipping).

  Args:
    state: the `ClipState` the clients clipped with.
    sums: `DPSums` summed over the cohort.
    key: PRNG key (used once).
    config: the `DPConfig`.
    released: public bool tree of releasable coordinates (see the module docstring).
    denominator: None for `config.expected_clients`, or a public scalar / tree
      broadcastable to the update (per-coordinate public counts).

  Returns:
    (new ClipState, mean update). The mean is 0 where `released` is False.
  """
  adaptive = config.target_quantile is not None
  z = (update_noise_multiplier(config.noise_multiplier, config.count_stddev) if adaptive
       else config.noise_multiplier)
  noise_key, count_key = jax.random.split(key)
  noisy = add_gaussian_noise(sums.update, noise_key, z * state.clip_norm, released)
  denominator = config.expected_clients if denominator is None else denominator
  denominator = tree_like(denominator, noisy, 'denominator')
  mean = jax.tree.map(lambda x, d: x / jnp.asarray(d, x.dtype), noisy, denominator)
  if adaptive:
    state = update_clip_norm(state, sums.below, count_key,
                             target_quantile=config.target_quantile,
                             clip_learning_rate=config.clip_learning_rate,
                             count_stddev=config.count_stddev,
                             expected_clients=config.expected_clients)
  return state, mean


# ----------------------------------------------------------------------------
# The aggregator (the engine's aggregation hook, `federated.Aggregator`).


class DPMeanSums(NamedTuple):
  """The in-graph sums of `dp_mean` (one client's, or the cohort's).

  Attributes:
    update: sum of the participants' clipped updates.
    below: [] sum of b_i - 1/2 (`quantile_contribution`).
    clipped: [] number of participants whose update was clipped.
    participants: [] number of participants.
    released: () (noise on every coordinate) or per leaf the number of real clients
      whose `present` covers each coordinate (its mask's shape).
  """
  update: PyTree
  below: jax.Array
  clipped: jax.Array
  participants: jax.Array
  released: PyTree = ()


def dp_mean(noise_multiplier: float, clip_norm: float, expected_clients: float, *,
            target_quantile: Optional[float] = None, clip_learning_rate: float = 0.2,
            count_stddev: Optional[float] = None, noise_on_present: bool = True):
  """DP-FedAvg as a `federated.Aggregator`: clip on the client, Gaussian noise on the server.

  Client side (`contribute`): a participating client (active, weight > 0) contributes its
  update clipped to L2 norm C over the coordinates it holds (`present`; all without), with
  weight 1 whatever its example count (example weights would change the sensitivity);
  padding and empty clients contribute exactly 0. Server side (`finish`): the sum gets
  N(0, (z_update C)^2) noise on the released coordinates and is divided by the fixed
  `expected_clients` m (`finish_dp_mean`); then, under adaptive clipping, C moves
  towards the `target_quantile` of the update norms (`update_clip_norm`).

  Released coordinates: with `noise_on_present` and clients that report `present`, those
  covered by some real client's `present`; the algorithms report the server's current
  mask there (`federated.fedavg(..., aggregator=)` with masks, masked FedAvg through
  `pruning.base.aggregation_view`), the same for every client and public (the server
  broadcast it), so the noise goes on the server's mask and nowhere else; coordinates
  outside it are exactly 0 in every client's update and come back as `fallback`.
  Without `present` (dense models): every coordinate. Pass `noise_on_present=False`
  when `present` is private (clients' own data-dependent masks, FedDST): then every
  coordinate gets noise. With submodels (`present` a client's width slice) the union of
  the cohort's slices is released; the denominator stays m (coordinates held by few
  clients are shrunk towards 0: the price of a public denominator).

  State: () under fixed clipping (stateless: runs through `federated.with_aggregator`
  on every algorithm), the `ClipState` under adaptive clipping. Round metrics:
  `dp_clip_norm` (the C the clients clipped to this round) and `dp_clipped_fraction`
  (the fraction of participants clipped; a diagnostic computed without noise, not
  itself private). Accounting is on the host (`epsilon`, `epsilon_per_round` with
  z = `noise_multiplier` and q = m / number of clients).

  Args:
    noise_multiplier: z >= 0 (the combined one under adaptive clipping).
    clip_norm: C > 0 (the initial one under adaptive clipping).
    expected_clients: m > 0, the expected clients per round (fixed denominator).
    target_quantile: gamma in [0, 1] for adaptive clipping; None keeps C fixed.
    clip_learning_rate: eta >= 0 of the geometric clip-norm update.
    count_stddev: sigma_b (default m / 20 under adaptive clipping).
    noise_on_present: noise only on the coordinates the clients' `present` covers.

  Returns:
    A `federated.Aggregator`.

  Raises:
    ValueError: a value out of range (`dp_config`), naming it.

  Example:
    >>> import jax, optax
    >>> from fedjax_prune import federated, testing
    >>> apply_fn, params, data = testing.tiny_problem(jax.random.key(0))
    >>> agg = federated.dp_mean(1.0, 0.5, expected_clients=3, target_quantile=0.5,
    ...                         count_stddev=1.0)
    >>> alg = federated.fedavg(apply_fn, optax.sgd(0.1), federated.LocalSchedule(batch_size=4),
    ...                        aggregator=agg)
    >>> state = alg.init(params, jax.random.key(1))
    >>> state, metrics = federated.make_round(alg)(state, data, federated.make_cohort([0, 1, 2]),
    ...                                           jax.random.key(2))
    >>> float(metrics['dp_clip_norm'])
    0.5
  """
  from fedjax_prune.federated._robust import Aggregator, Contribution  # no import cycle
  config = dp_config(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                     expected_clients=expected_clients, target_quantile=target_quantile,
                     clip_learning_rate=clip_learning_rate, count_stddev=count_stddev)
  adaptive = config.target_quantile is not None

  def init(params) -> Any:
    del params
    return init_clip_state(config) if adaptive else ()

  def clip_state(state) -> ClipState:
    return state if adaptive else ClipState(jnp.asarray(config.clip_norm, jnp.float32))

  def contribute(state, update, weight, present, client, key) -> Any:
    del key
    active = jnp.asarray(client.active, bool)
    part = (active & (jnp.asarray(weight) > 0)).astype(jnp.float32)
    dp = dp_contribution(update, True if present is None else present, clip_state(state))
    clipped = jax.tree.map(lambda x: x * part.astype(x.dtype), dp.update)
    released = ()
    if present is not None and noise_on_present:
      present = tree_like(present, update, 'present')
      released = jax.tree.map(
          lambda p: jnp.asarray(p, bool).astype(jnp.float32) * active.astype(jnp.float32), present)
    return Contribution(DPMeanSums(clipped, dp.below * part,
                                   (dp.below < 0).astype(jnp.float32) * part, part, released))

  def finish(state, summed, fallback, key):
    sums: DPMeanSums = summed.sums
    everywhere = isinstance(sums.released, tuple) and not sums.released
    released = True if everywhere else jax.tree.map(lambda c: c > 0, sums.released)
    used = clip_state(state)
    new, mean = finish_dp_mean(used, DPSums(sums.update, sums.below), key, config, released)
    if fallback is not None and not everywhere:
      mean = jax.tree.map(lambda m, r, old: jnp.where(r, m, old), mean, released, fallback)
    metrics = {'dp_clip_norm': used.clip_norm,
               'dp_clipped_fraction': sums.clipped / jnp.maximum(sums.participants, 1.0)}
    return mean, (new if adaptive else state), metrics

  return Aggregator(init, contribute, finish)


# ----------------------------------------------------------------------------
# Accounting (host side, Python floats).


def _poisson_gaussian_event(noise_multiplier: float, sampling_probability: float):
  import dp_accounting  # imported here: it pulls in scipy and mpmath
  return dp_accounting.PoissonSampledDpEvent(
      sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier))


def epsilon(noise_multiplier: float, sampling_probability: float, rounds: int, delta: float, *,
            accountant: str = 'rdp') -> float:
  """epsilon of `rounds` Poisson-sampled Gaussian rounds at `delta` (dp_accounting).

  Args:
    noise_multiplier: z (the combined one under adaptive clipping:
      `config.noise_multiplier`). 0 gives inf.
    sampling_probability: q = expected clients per round / number of clients.
    rounds: number of rounds (0 gives 0).
    delta: target delta in (0, 1).
    accountant: 'rdp' (dp_accounting's RdpAccountant, default orders) or 'pld'
      (its PLDAccountant: tighter, slower).

  Returns:
    epsilon, a Python float.

  Example:
    >>> round(epsilon(1.0, 0.01, 1000, 1e-5), 3)
    2.101
  """
  check_dp(noise_multiplier=noise_multiplier, sampling_probability=sampling_probability,
           rounds=rounds, delta=delta)
  if accountant not in ACCOUNTANTS:
    raise ValueError(f'accountant must be one of {ACCOUNTANTS}, got {accountant!r}')
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  import dp_accounting
  event = dp_accounting.SelfComposedDpEvent(
      _poisson_gaussian_event(noise_multiplier, sampling_probability), int(rounds))
  acc = (dp_accounting.rdp.RdpAccountant() if accountant == 'rdp'
         else dp_accounting.pld.PLDAccountant())
  acc.compose(event)
  return float(acc.get_epsilon(delta))


def epsilon_per_round(noise_multiplier: float, sampling_probability: float, rounds: int,
                      delta: float) -> np.ndarray:
  """[rounds] float64: epsilon after rounds 1, 2, ..., `rounds` (RDP accountant), for the records.

  RDP composes additively, so the RDP curve of r rounds is r times that of one
  round; each entry is dp_accounting's conversion of that curve, and the last
  equals `epsilon(..., rounds, delta)`.
  """
  check_dp(noise_multiplier=noise_multiplier, sampling_probability=sampling_probability,
           rounds=rounds, delta=delta)
  if noise_multiplier == 0:
    return np.full((rounds,), np.inf)
  import dp_accounting
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(_poisson_gaussian_event(noise_multiplier, sampling_probability))
  return _rdp_curve(acc, rounds, delta)


def _rdp_curve(acc, rounds: int, delta: float) -> np.ndarray:
  """[rounds] epsilon after 1..rounds repetitions of the one round composed into `acc`."""
  import dp_accounting
  orders, rdp_one = np.asarray(acc.orders), np.asarray(acc.rdp)
  return np.array([dp_accounting.rdp.compute_epsilon(orders, r * rdp_one, delta)[0]
                   for r in range(1, rounds + 1)], np.float64)


def fixed_cohort_epsilon_per_round(noise_multiplier: float, num_clients: int,
                                   clients_per_round: int, rounds: int, delta: float, *,
                                   sensitivity_ratio: float = 2.0) -> np.ndarray:
  """[rounds] float64 epsilon after each round for cohorts of exactly `clients_per_round`
  of `num_clients` clients drawn uniformly without replacement (what the experiments
  run: `experiments.runtime.cohort_for`), under replace-one adjacency.

  `epsilon_per_round` is the DP-FedAvg papers' convention: Poisson sampling (each client
  in independently with probability q) and add/remove-one adjacency. A fixed-size cohort
  is not Poisson sampled; dp_accounting's accountant for it is
  `SampledWithoutReplacementDpEvent` (Wang, Balle, Kasiviswanathan, AISTATS 2019), which
  holds for replace-one adjacency only (the number of clients is public). Replacing one
  client moves the clipped sum by up to `sensitivity_ratio` x C (2 for DP-FedAvg's
  clipped updates; 1 for 0/1 vote vectors, whose difference has one vote vector's norm
  bound), so noise of std z C is a Gaussian of multiplier z / sensitivity_ratio here.
  A replace-one epsilon is not directly comparable with an add/remove one (replacing is
  removing one client and adding another), and the subsampling bound is looser: at z = 1,
  q = 10/300, 600 rounds, delta 1e-3 this gives 74 where the Poisson convention gives 4.2.

  Args:
    noise_multiplier: z >= 0 (0 gives inf).
    num_clients: n >= 1, the clients the cohorts are drawn from.
    clients_per_round: m in [1, n].
    rounds: number of rounds (>= 1).
    delta: target delta in (0, 1).
    sensitivity_ratio: replace-one sensitivity over the one-client clip bound (> 0).

  Returns:
    [rounds] epsilons; the last equals `rounds` self-composed events' epsilon.
  """
  if (isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer))
      or isinstance(clients_per_round, bool)
      or not isinstance(clients_per_round, (int, np.integer))
      or not 1 <= clients_per_round <= num_clients):
    raise ValueError(f'clients_per_round must be an integer in [1, num_clients], got '
                     f'{clients_per_round!r} of num_clients {num_clients!r}')
  check_dp(noise_multiplier=noise_multiplier, sampling_probability=clients_per_round / num_clients,
           rounds=rounds, delta=delta)
  if not (isinstance(sensitivity_ratio, (int, float)) and sensitivity_ratio > 0):
    raise ValueError(f'sensitivity_ratio must be a number > 0, got {sensitivity_ratio!r}')
  if noise_multiplier == 0:
    return np.full((rounds,), np.inf)
  import dp_accounting
  acc = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(
      int(num_clients), int(clients_per_round),
      dp_accounting.GaussianDpEvent(noise_multiplier / sensitivity_ratio)))
  return _rdp_curve(acc, rounds, delta)
