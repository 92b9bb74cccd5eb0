"""Attacks by malicious clients, as client-side transforms selected per client in the round.

An `Attack` is a pair of pure functions of ONE client::

  data(data, key) -> data                   before local training (label flipping, backdoor)
  update(update, present, key) -> update    after local training, before the aggregator
                                            (sign flip, scaling, Gaussian noise)

Who attacks is data, not Python control flow: `attackers_N`, a bool array over the
dataset's clients, is indexed with the client's id inside the compiled round and the
transform selected with `jnp.where` (one program for every cohort). `poison_data(alg,
attack, attackers_N)` applies the data part around an algorithm's `client_update`;
`with_attack(aggregator, attack, attackers_N)` applies the update part inside an
aggregator's `contribute`, so a defence (e.g. `norm_bound`) sees the attacked update.
Attack keys are folded from the client's key: an honest client trains exactly as
without the attack.

The aggregation hook is also where differential privacy and compression plug in:
a DP aggregator's `contribute` clips (as `norm_bound`) and its `finish` adds Gaussian
noise to the summed total with the server key before dividing (its accountant state in
`init`); a compressor's `contribute` quantises / sparsifies the update with the client's
key (its error-feedback memory a per-client row of the aggregator state, returned in
`per_client` and scattered back by `finish`).

References:
  Bagdasaryan et al., How To Backdoor Federated Learning, AISTATS 2020 (model
  replacement: the update scaled by s). Gu et al., BadNets, 2017 (pixel-trigger backdoor).
  Fang et al., Local Model Poisoning Attacks to Byzantine-Robust FL, USENIX Security
  2020 (sign flipping, Gaussian, label flipping as baselines).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_prune.data import ClientData
from fedjax_prune.federated import _keys
from fedjax_prune.federated._engine import ClientInfo, ClientOutput, FedAlgorithm
from fedjax_prune.federated._robust import Aggregator, Contribution
from fedjax_prune.types import PRNGKey, PyTree

ATTACK_STREAM = 0xBAD  # folded into the client's key for the attack's randomness


def _same_data(data: ClientData, key: PRNGKey) -> ClientData:
  del key
  return data


def _same_update(update: PyTree, present: PyTree | None, key: PRNGKey) -> PyTree:
  del present, key
  return update


class Attack(NamedTuple):
  """A malicious client's transforms (module docstring).

  Attributes:
    data: `data(client_data, key) -> client_data` (x [E, ...], y [E], num_examples []).
    update: `update(update, present, key) -> update` (update = w_server - w_client).
  """
  data: Callable[[ClientData, PRNGKey], ClientData] = _same_data
  update: Callable[[PyTree, Any, PRNGKey], PyTree] = _same_update


def no_attack() -> Attack:
  """Every client honest."""
  return Attack()


def sign_flip() -> Attack:
  """The attacker sends -update (pushes the model the other way)."""
  return Attack(update=lambda u, present, key: jax.tree.map(jnp.negative, u))


def scaled_update(scale: float) -> Attack:
  """Model replacement: the attacker sends scale * update (Bagdasaryan et al.)."""
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
    raise ValueError(f"scaled_update scale must be a finite number, got {scale!r}")
  return Attack(update=lambda u, present, key: jax.tree.map(
      lambda x: x * jnp.asarray(scale, x.dtype), u))


def gaussian_noise(sigma: float) -> Attack:
  """The attacker adds N(0, sigma^2) to every coordinate it holds."""
  if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (
      math.isfinite(sigma) and sigma >= 0):
    raise ValueError(f"gaussian_noise sigma must be a finite number >= 0, got {sigma!r}")

  def update(u, present, key):
    leaves, treedef = jax.tree.flatten(u)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + jnp.asarray(sigma, x.dtype) * jax.random.normal(k, x.shape, x.dtype)
             for x, k in zip(leaves, keys)]
    noisy = jax.tree.unflatten(treedef, noisy)
    if present is None:
      return noisy
    return jax.tree.map(lambda n, x, p: jnp.where(p, n, x), noisy, u, present)

  return Attack(update=update)


def label_flip(num_classes: int, permutation: Any = None) -> Attack:
  """Training labels y -> num_classes - 1 - y, or -> permutation[y]."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"label_flip num_classes must be an int >= 2, got {num_classes!r}")
  if permutation is None:
    perm = np.arange(num_classes)[::-1]
  else:
    perm = np.asarray(permutation)
    if perm.shape != (num_classes,) or sorted(perm.tolist()) != list(range(num_classes)):
      raise ValueError(f"label_flip permutation must be a permutation of range({num_classes}), "
                       f"got {permutation!r}")
  perm = jnp.asarray(perm, jnp.int32)

  def data(d: ClientData, key):
    del key
    return d._replace(y=perm[d.y].astype(d.y.dtype))

  return Attack(data=data)


class Trigger(NamedTuple):
  """A square pixel patch: `size` x `size` pixels of `value` (in the stored units of x,
  e.g. 255 for uint8 images), `offset` pixels from the bottom-right corner, all channels."""
  size: int = 3
  value: float = 255.0
  offset: int = 1


def check_trigger(trigger: Trigger, image_shape: tuple) -> None:
  """Raises ValueError when the trigger does not fit images of `image_shape` (H, W, C)."""
  if len(image_shape) != 3:
    raise ValueError(f"a pixel trigger needs images (H, W, C), got examples of shape {image_shape}")
  if not (isinstance(trigger.size, int) and trigger.size >= 1 and isinstance(trigger.offset, int)
          and trigger.offset >= 0):
    raise ValueError(f"trigger size must be an int >= 1 and offset an int >= 0, got {trigger}")
  if trigger.size + trigger.offset > min(image_shape[:2]):
    raise ValueError(f"trigger {trigger} does not fit {image_shape[:2]} images")


def stamp(x: jax.Array, trigger: Trigger, rows: jax.Array | None = None) -> jax.Array:
  """Images x [N, H, W, C] with the trigger stamped (on the rows where `rows` [N] is True)."""
  h, w = x.shape[-3], x.shape[-2]
  r = jnp.arange(h)[:, None]
  c = jnp.arange(w)[None, :]
  lo_r, lo_c = h - trigger.offset - trigger.size, w - trigger.offset - trigger.size
  patch = (r >= lo_r) & (r < lo_r + trigger.size) & (c >= lo_c) & (c < lo_c + trigger.size)
  patch = patch[None, :, :, None]
  if rows is not None:
    patch = patch & rows.reshape((-1, 1, 1, 1))
  return jnp.where(patch, jnp.asarray(trigger.value, x.dtype), x)


def poisoned_count(fraction: float, num_examples: jax.Array) -> jax.Array:
  """round(fraction * n): how many of a backdoor attacker's n examples carry the trigger."""
  return jnp.round(fraction * num_examples.astype(jnp.float32)).astype(jnp.int32)


def backdoor(trigger: Trigger, target: int, fraction: float) -> Attack:
  """Pixel-trigger backdoor (BadNets): the first round(fraction * n) of the attacker's n
  training examples get the trigger and the label `target` (local training shuffles
  its examples, so which ones does not matter)."""
  if isinstance(target, bool) or not isinstance(target, int) or target < 0:
    raise ValueError(f"backdoor target must be a class index >= 0, got {target!r}")
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise ValueError(f"backdoor fraction must be a number in (0, 1], got {fraction!r}")

  def data(d: ClientData, key):
    del key
    check_trigger(trigger, d.x.shape[1:])
    rows = jnp.arange(d.x.shape[0]) < poisoned_count(fraction, d.num_examples)
    return d._replace(x=stamp(d.x, trigger, rows),
                      y=jnp.where(rows, jnp.asarray(target, d.y.dtype), d.y))

  return Attack(data=data)


def _is_attacker(attackers_N: jax.Array, client: ClientInfo) -> jax.Array:
  return jnp.asarray(attackers_N, bool)[client.client_id] & jnp.asarray(client.active, bool)


def poison_data(alg: FedAlgorithm, attack: Attack, attackers_N: Any) -> FedAlgorithm:
  """`alg` whose clients in `attackers_N` ([N] bool over the dataset's clients) train on
  `attack.data(data)`; the others on their own data (selected with `where` in the round)."""
  attackers_N = jnp.asarray(attackers_N, bool)

  def client_update(state, data: ClientData, info: ClientInfo, key: PRNGKey) -> ClientOutput:
    bad = _is_attacker(attackers_N, info)
    poisoned = attack.data(data, _keys.fold_in(key, ATTACK_STREAM))
    data = jax.tree.map(lambda p, x: jnp.where(bad, p, x), poisoned, data)
    return alg.client_update(state, data, info, key)

  return FedAlgorithm(alg.init, client_update, alg.server_update)


def with_attack(aggregator: Aggregator, attack: Attack, attackers_N: Any) -> Aggregator:
  """`aggregator` whose clients in `attackers_N` contribute `attack.update(update)`."""
  attackers_N = jnp.asarray(attackers_N, bool)

  def contribute(state, update, weight, present, client: ClientInfo, key) -> Contribution:
    bad = _is_attacker(attackers_N, client)
    attacked = attack.update(update, present, _keys.fold_in(key, ATTACK_STREAM))
    update = jax.tree.map(lambda a, u: jnp.where(bad, a, u), attacked, update)
    return aggregator.contribute(state, update, weight, present, client, key)

  return aggregator._replace(contribute=contribute)


def choose_attackers(num_clients: int, fraction: float, seed: int) -> np.ndarray:
  """[num_clients] bool: round(fraction * num_clients) clients drawn without replacement
  by `np.random.default_rng(seed)` (host side, once per run)."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
    raise ValueError(f"attacker fraction must be in [0, 1] (more attackers than clients "
                     f"otherwise), got {fraction!r}")
  count = int(round(fraction * num_clients))
  out = np.zeros(num_clients, bool)
  out[np.random.default_rng(seed).choice(num_clients, count, replace=False)] = True
  return out


def attack_success_rate(evaluate_fn: Callable, params, batch_stats, x: Any, y: Any,
                        trigger: Trigger, target: int) -> float:
  """The backdoor's success rate: the fraction of triggered test images whose true class
  is not `target` that the model classifies as `target`.

  Args:
    evaluate_fn: `evaluate_fn(params, batch_stats, x, y) -> federated.EvalSums`
      (`federated.make_evaluate(apply_fn)`, jitted or not).
    params, batch_stats: the model.
    x, y: test images [T, H, W, C] (stored units) and labels [T].
    trigger, target: the attack's.

  Returns:
    A host float in [0, 1]; nan when every test image is of class `target`.
  """
  y_np = np.asarray(y)
  keep = y_np != target
  if not keep.any():
    return float("nan")
  x_kept = jnp.asarray(np.asarray(x)[keep])
  check_trigger(trigger, x_kept.shape[1:])
  sums = evaluate_fn(params, batch_stats, stamp(x_kept, trigger),
                     jnp.full((x_kept.shape[0],), target, jnp.asarray(y).dtype))
  return float(sums.correct_sum) / float(sums.num_examples)
