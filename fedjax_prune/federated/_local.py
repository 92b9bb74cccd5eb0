"""Local client training as one compiled loop over the client's real steps.

A client's data is the padded slice `ClientData(x [E, ...], y [E], num_examples [])`.
Batches are built by index arithmetic from per-epoch permutations drawn with the
client's key, so nothing leaves the device. The step loop runs only the client's
real steps (those holding at least one real example): its trip count is a traced
number, so a client with few examples pays for few steps, padded steps are never
executed (no per-step branch), and under `vmap` the loop runs the cohort's
longest client while finished clients keep their state (a `select`).

That loop exists once, `run_local`. Each kind of local training is a `LocalVariant`
of it, split as FedJAX splits a client update (client_init / client_step /
client_final): `make_local_train`'s dense variant (optionally masked, optionally
penalised as FedProx is), its low-rank variant (dense kernels held as factors,
`performance.LowRankDense`) and CAVP's joint weight + gate step (`pruning.cavp`). A variant writes
one step; the loop owns the batches, the metrics and the step loop. The batching
helpers here are private to the package (`federated` exports what a user needs).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune.masks import _ops as masks_lib
from fedjax_prune import tree as tree_lib
from fedjax_prune.data import ClientData
from fedjax_prune.federated import _keys
from fedjax_prune.types import BatchStats, Masks, Params, PRNGKey, PyTree

if TYPE_CHECKING:
  from fedjax_prune.performance import LowRankDense


@dataclasses.dataclass(frozen=True)
class LocalSchedule:
  """How long and with what batch a client trains each round.

  Attributes:
    batch_size: examples per local step (B).
    num_epochs: local epochs over the client's data (used when num_steps is None);
      each epoch takes ceil(n_k / B) steps, the last one partial.
    num_steps: if set, a fixed number of local steps per client, batches drawn
      from successive reshuffled epochs (FedJAX/pfl-style "local updates").
    unroll: the first `unroll` local steps are written out as straight-line code,
      the rest run in the compiled step loop (`loop_real_steps`); a performance
      knob with no effect on results, at `unroll` times the compile time of a
      step. A client with fewer real steps computes the written-out steps it does
      not take and discards them: `waste_free_unroll(data.num_examples, schedule)`
      gives the largest value that wastes nothing. 1 = every step in the loop.
    differentiable: run the steps as a `lax.scan` over all S padded-layout steps,
      those past the client's own steps skipped by a `lax.cond`, instead of a
      loop with a traced trip count: same results, and reverse-mode
      differentiable through local training (meta-learning), at some speed on
      CPU (a branch per step).
  """
  batch_size: int
  num_epochs: int = 1
  num_steps: int | None = None
  unroll: int = 1
  differentiable: bool = False

  def __post_init__(self):
    # numpy integers (from configs, arrays) become Python ints: the schedule is a static,
    # hashed jit argument, and np.int64(4) should mean 4.
    for name in ("batch_size", "num_epochs", "num_steps", "unroll"):
      value = getattr(self, name)
      if isinstance(value, np.integer):
        object.__setattr__(self, name, int(value))
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
    if self.num_steps is None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
      raise ValueError(f"num_epochs must be an int >= 1, got {self.num_epochs!r}")
    if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
      raise ValueError(f"num_steps must be None or an int >= 1, got {self.num_steps!r}")
    if not isinstance(self.unroll, int) or isinstance(self.unroll, bool) or self.unroll < 1:
      raise ValueError(f"unroll must be an int >= 1, got {self.unroll!r}")
    if not isinstance(self.differentiable, bool):
      raise ValueError(f"differentiable must be a bool, got {self.differentiable!r}")

  def steps_per_epoch(self, max_examples: int) -> int:
    return -(-max_examples // self.batch_size)

  def total_steps(self, max_examples: int) -> int:
    """The static number S of padded-layout steps for clients padded to `max_examples` (the
    most any client trains; `num_real_steps` is a client's own count)."""
    if self.num_steps is not None:
      return self.num_steps
    return self.num_epochs * self.steps_per_epoch(max_examples)


class LocalState(NamedTuple):
  params: Params
  batch_stats: BatchStats
  opt_state: Any


class LocalMetrics(NamedTuple):
  """Sums over the client's local steps (divide by num_examples for means)."""
  loss_sum: jax.Array       # [] sum of per-example training loss
  correct_sum: jax.Array    # [] number of correctly classified training examples
  num_examples: jax.Array   # [] examples processed (with repeats over epochs)
  num_steps: jax.Array      # [] real (non-padded) steps taken

  def add_step(self, loss_sum: jax.Array, correct: jax.Array, mask_B: jax.Array) -> "LocalMetrics":
    """These sums plus one step's: its summed loss, correct count and example mask [B]."""
    return LocalMetrics(self.loss_sum + loss_sum, self.correct_sum + correct,
                        self.num_examples + jnp.sum(mask_B).astype(jnp.float32), self.num_steps + 1.0)


def round_train_metrics(summed: LocalMetrics, num_clients) -> dict:
  """The round's training metrics from the cohort's summed `LocalMetrics`: mean loss and
  accuracy per example, examples and local steps taken, and the number of clients."""
  count = jnp.maximum(summed.num_examples, 1.0)
  return {"train_loss": summed.loss_sum / count, "train_accuracy": summed.correct_sum / count,
          "train_examples": summed.num_examples, "local_steps": summed.num_steps,
          "num_clients": num_clients}


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy. logits [B, K], integer labels [B] -> [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def example_permutation(key: PRNGKey, num_examples: jax.Array, max_examples: int) -> jax.Array:
  """[E] permutation whose first n entries are the real examples in random order
  (`num_examples` = n of `max_examples` = E padded examples; an epoch's order, or,
  cut to its first B entries, a random batch without replacement).

  Example i's sort key depends only on (key, i), not on E, so padding the
  example axis further never changes a client's batches: with JAX's partitionable
  threefry (the default, checked below) entry i of `uniform(key, (E,))` hashes the
  counter i alone. (One hash per example; a `fold_in(key, i)` per example cost a
  second one, a fifth of a one-client round of a small model on CPU.)
  """
  if not jax.config.jax_threefry_partitionable:
    raise RuntimeError("fedjax_prune needs jax_threefry_partitionable=True (JAX's default): "
                       "client batches would otherwise depend on the padded example count")
  noise = _keys.uniform(key, (max_examples,))
  valid = jnp.arange(max_examples) < num_examples
  return jnp.argsort(jnp.where(valid, noise, 2.0))


def epoch_permutations(key: PRNGKey, num_examples: jax.Array, max_examples: int,
                       schedule: LocalSchedule) -> jax.Array | None:
  """[num_epochs, E] permutations drawn once before the step loop (epochs mode).

  Drawing them per step cost ~E hashes and a sort every step, which dominated
  small models; returns None in num_steps mode (permutations drawn per step).
  """
  if schedule.num_steps is not None:
    return None
  return jax.vmap(lambda e: example_permutation(_keys.fold_in(key, e), num_examples, max_examples))(
      jnp.arange(schedule.num_epochs))


class StepBatches(NamedTuple):
  """Every real local step's batch, in step order (epochs mode), made before the step loop.

  Attributes:
    indices: [S, B] int32 example indices of real step t in row t (S =
      `schedule.total_steps(E)`; rows past the client's real steps are unused).
    mask: [S, B] bool, False for padding positions.
  """
  indices: jax.Array
  mask: jax.Array


def plan_step_batches(key: PRNGKey, num_examples: jax.Array, max_examples: int,
                      schedule: LocalSchedule) -> StepBatches | None:
  """The batches of all of a client's real steps at once (epochs mode; None in steps mode).

  The same batches as `batch_indices(key, static_step_index(t, ...), ...)` for
  each real step t, computed as one [S, B] gather before the step loop: the
  step then reads its row, instead of running a handful of scalar index ops
  (divisions, remainders, a gather) per step. On XLA:CPU each is a separate
  kernel launch: a fifth of a one-client round of logistic regression (64 ->
  52 us, measured).
  """
  permutations = epoch_permutations(key, num_examples, max_examples, schedule)
  if permutations is None:
    return None

  def batch_of(real_step):  # the per-step arithmetic, vectorised over all steps
    step = static_step_index(real_step, num_examples, max_examples, schedule)
    return batch_indices(key, step, num_examples, max_examples, schedule, permutations)

  return StepBatches(*jax.vmap(batch_of)(jnp.arange(schedule.total_steps(max_examples))))


def batch_indices(key: PRNGKey, step: jax.Array, num_examples: jax.Array, max_examples: int,
                  schedule: LocalSchedule, permutations: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Example indices [B] and validity mask [B] of local step `step`.

  Epoch e uses the permutation drawn from fold_in(key, e), so the batches of a
  client depend only on its key, never on which other clients share the round.
  `permutations` (from `epoch_permutations`) avoids redrawing them every step.
  """
  batch = schedule.batch_size
  offsets = jnp.arange(batch)
  if schedule.num_steps is None:
    steps_per_epoch = schedule.steps_per_epoch(max_examples)
    epoch, within = step // steps_per_epoch, step % steps_per_epoch
    if permutations is None:
      perm = example_permutation(_keys.fold_in(key, epoch), num_examples, max_examples)
    else:
      perm = permutations[epoch]
    positions = within * batch + offsets
    mask = positions < num_examples
    return perm[jnp.minimum(positions, max_examples - 1)], mask
  # Fixed number of steps: an endless stream of reshuffled epochs.
  n = jnp.maximum(num_examples, 1)
  positions = step * batch + offsets
  epochs, within = positions // n, positions % n
  first = epochs[0]
  # A batch spans at most ceil(B / n) + 1 epochs; B <= n in practice, so two
  # permutations cover it, and a per-example permutation handles the rare rest.
  perm0 = example_permutation(_keys.fold_in(key, first), num_examples, max_examples)
  perm1 = example_permutation(_keys.fold_in(key, first + 1), num_examples, max_examples)

  def general(_):
    return jax.vmap(lambda e, i: example_permutation(_keys.fold_in(key, e), num_examples,
                                                    max_examples)[i])(epochs, within)

  idx = jax.lax.cond(jnp.all(epochs <= first + 1),
                        lambda _: jnp.where(epochs == first, perm0[within], perm1[within]),
                        general, None)
  return idx, jnp.broadcast_to(num_examples > 0, (batch,))


def num_real_steps(num_examples: jax.Array, max_examples: int,
                   schedule: LocalSchedule) -> jax.Array:
  """[] int32: the local steps of a client with `num_examples` that hold a real example.

  Epochs mode: num_epochs * ceil(n / B). Steps mode: num_steps (0 for an empty client).
  Never more than `schedule.total_steps(max_examples)`.
  """
  n = jnp.asarray(num_examples, jnp.int32)
  if schedule.num_steps is None:
    return schedule.num_epochs * ((n + schedule.batch_size - 1) // schedule.batch_size)
  return jnp.where(n > 0, schedule.num_steps, 0).astype(jnp.int32)


def static_step_index(real_step: jax.Array, num_examples: jax.Array, max_examples: int,
                      schedule: LocalSchedule) -> jax.Array:
  """The padded-layout step (what `batch_indices` takes) of the client's `real_step`-th real step.

  In epochs mode the padded layout has `steps_per_epoch(max_examples)` steps per
  epoch, of which a client with n examples uses the first ceil(n / B); this maps
  real step t to epoch t // ceil(n/B), position t % ceil(n/B).
  """
  if schedule.num_steps is not None:
    return real_step
  batch = schedule.batch_size
  own_steps_per_epoch = jnp.maximum((jnp.asarray(num_examples, jnp.int32) + batch - 1) // batch, 1)
  epoch, within = real_step // own_steps_per_epoch, real_step % own_steps_per_epoch
  return epoch * schedule.steps_per_epoch(max_examples) + within


def loop_real_steps(step_fn: Callable[[Any, jax.Array], Any], carry: Any, num_steps: jax.Array,
                    unroll: int = 1, *, max_steps: int | None = None,
                    differentiable_max_steps: int | None = None) -> Any:
  """`carry = step_fn(carry, t)` for t in [0, num_steps), `num_steps` traced.

  With `unroll` = k > 1 the first k steps are straight-line code, each kept by a
  `select` only when t < num_steps (so a client with fewer than k real steps
  computes and discards the rest: exact no-ops, but not free), and a loop runs
  steps k .. num_steps - 1. Results do not depend on k. Why: on XLA:CPU every
  entry into a loop body costs ~1.5 ms for the LEAF CNN (an iteration boundary
  is a barrier in XLA's thunk executor; straight-line steps overlap one step's
  weight update with the next step's convolutions): a one-client round with its
  4 steps written out ran ~9 % faster, an unsharded 8-client round ~8 %, but
  logistic regression 40 % slower (docs/results/engine.md), so the experiments'
  'auto' strategy times it. `waste_free_unroll` picks a k that wastes nothing.
  With a static bound `max_steps` <= k (num_steps never exceeds it) no loop is
  compiled at all.

  With `differentiable_max_steps` = S (static, >= num_steps), it is instead a
  `lax.scan` over S steps whose steps t >= num_steps are skipped by `lax.cond`:
  the same result, reverse-mode differentiable.
  """
  if differentiable_max_steps is not None:
    def padded_step(c, t):
      return jax.lax.cond(t < num_steps, lambda c: step_fn(c, t), lambda c: c, c), None

    return jax.lax.scan(padded_step, carry, jnp.arange(differentiable_max_steps),
                        unroll=max(1, min(unroll, differentiable_max_steps)))[0]
  if unroll <= 1:
    return jax.lax.fori_loop(0, num_steps, lambda t, c: step_fn(c, t), carry)
  for t in range(unroll):
    carry = tree_lib.where(t < num_steps, step_fn(carry, jnp.asarray(t, jnp.int32)), carry)
  if max_steps is not None and max_steps <= unroll:
    return carry
  # Zero iterations when num_steps <= unroll.
  return jax.lax.fori_loop(unroll, jnp.maximum(num_steps, unroll), lambda t, c: step_fn(c, t), carry)


def waste_free_unroll(num_examples: Any, schedule: LocalSchedule, limit: int = 4) -> int:
  """The largest `LocalSchedule.unroll` (<= `limit`) at which no client computes a step it
  discards: the fewest real local steps of any client with examples (host-side).

  Args:
    num_examples: [N] examples per client of the federated dataset (e.g.
      `data.num_examples`); clients with none are ignored (padding clients of
      a sharded cohort then run the unrolled steps and discard them).
    schedule: the clients' schedule (its own `unroll` is ignored).
    limit: the most steps written out (compile time grows with it).

  Returns:
    k >= 1; 1 means no unrolling.
  """
  if not isinstance(limit, int) or limit < 1:
    raise ValueError(f"limit must be an int >= 1, got {limit!r}")
  counts = np.asarray(num_examples).reshape(-1)
  counts = counts[counts > 0]
  if counts.size == 0:
    return 1
  fewest = int(num_real_steps(int(counts.min()), int(counts.max()), schedule))
  return max(1, min(limit, fewest))


def run_schedule_steps(step_fn: Callable[[Any, jax.Array], Any], carry: Any,
                       num_examples: jax.Array, max_examples: int, schedule: LocalSchedule) -> Any:
  """`loop_real_steps` over the real steps of a client with `num_examples` (padded to
  `max_examples`) under `schedule`: its unroll, and its `differentiable` mode (a scan
  over the S padded-layout steps). `step_fn(carry, real_step)` as in `loop_real_steps`."""
  total = schedule.total_steps(max_examples)
  return loop_real_steps(step_fn, carry, num_real_steps(num_examples, max_examples, schedule),
                         min(schedule.unroll, total), max_steps=total,
                         differentiable_max_steps=total if schedule.differentiable else None)


def step_batch(data: ClientData, real_step: jax.Array, shuffle_key: PRNGKey, augment_key: PRNGKey,
               schedule: LocalSchedule, plan: StepBatches | jax.Array | None,
               train_transform: Callable | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The batch of a client's `real_step`-th real local step: (x [B, ...], y [B], mask [B], step),
  `step` being its padded-layout index (`static_step_index`), which keys the augmentation
  `train_transform(x, fold_in(augment_key, step))` and anything else per step.

  `plan`: `plan_step_batches(shuffle_key, ...)` (fastest), the [epochs, E]
  `epoch_permutations`, or None (drawn here; steps mode). Same batches each way.
  """
  max_examples = data.x.shape[0]
  step = static_step_index(real_step, data.num_examples, max_examples, schedule)
  if isinstance(plan, StepBatches):
    idx, mask = plan.indices[real_step], plan.mask[real_step]
  else:
    idx, mask = batch_indices(shuffle_key, step, data.num_examples, max_examples, schedule, plan)
  x, y = data.x[idx], data.y[idx]
  if train_transform is not None:
    x = train_transform(x, _keys.fold_in(augment_key, step))
  return x, y, mask, step


LossFn = Callable[[jax.Array, jax.Array], jax.Array]
PenaltyFn = Callable[[Params, Any], jax.Array]
TransformFn = Callable[[jax.Array, PRNGKey], jax.Array]


class StepInput(NamedTuple):
  """What `run_local` hands a variant's `client_step` at one real local step."""
  x: jax.Array          # [B, ...] the step's examples (after the schedule's train_transform)
  y: jax.Array          # [B] their targets
  mask: jax.Array       # [B] bool, False for padding positions
  real_step: jax.Array  # [] int32: the client's real step 0, 1, ...
  step: jax.Array       # [] int32: its padded-layout index (`static_step_index`)
  key: PRNGKey | None   # fold_in(step-key root, step) if `LocalVariant.step_keys`, else None


class LocalVariant(NamedTuple):
  """One kind of local training, split as FedJAX splits a client update; `run_local` runs it.

  `inputs` is the per-call pytree given to `run_local` (the server's params, masks,
  penalty anchor, ...): loop-invariant, so the step reads it instead of carrying it.

  Attributes:
    client_init: `(inputs) -> state`, the step state before the first step.
    client_step: `(inputs, state, batch: StepInput) -> (state, loss_sum, correct)`: one
      real local step, with its batch's summed loss and correct count (`LocalMetrics`).
    client_final: `(inputs, state, num_steps) -> result`, from the state after the
      client's last real step; `num_steps` [] int32 is how many it took.
    step_keys: `client_step` gets a key per step (`StepInput.key`), from a third key
      split off the client's key beside the shuffle and augmentation keys.
  """
  client_init: Callable[[Any], Any]
  client_step: Callable[[Any, Any, StepInput], tuple[Any, jax.Array, jax.Array]]
  client_final: Callable[[Any, Any, jax.Array], Any]
  step_keys: bool = False


def run_local(variant: LocalVariant, inputs: Any, data: ClientData, key: PRNGKey,
              schedule: LocalSchedule, train_transform: TransformFn | None = None
              ) -> tuple[Any, LocalMetrics]:
  """Trains one client with `variant`: the one local-training loop of the library.

  The client's key splits into shuffle and augmentation keys (and the variant's
  step-key root); every real step's batch is planned before the loop
  (`plan_step_batches`); `client_step` runs for the client's real steps only
  (`run_schedule_steps`: a traced trip count, the schedule's written-out first steps,
  or its differentiable scan), so a padded step never runs and under `vmap` a
  finished client keeps its state (a `select`).

  Returns:
    (client_final(inputs, state, num_steps), LocalMetrics summed over the steps).
  """
  max_examples = data.x.shape[0]
  shuffle_key, augment_key, *step_key_root = _keys.split(key, 3 if variant.step_keys else 2)
  del key
  state = variant.client_init(inputs)
  plan = plan_step_batches(shuffle_key, data.num_examples, max_examples, schedule)

  def train_step(carry, real_step):
    state, metrics = carry
    x, y, mask, step = step_batch(data, real_step, shuffle_key, augment_key, schedule, plan,
                                  train_transform)
    step_key = _keys.fold_in(step_key_root[0], step) if variant.step_keys else None
    state, loss_sum, correct = variant.client_step(
        inputs, state, StepInput(x, y, mask, real_step, step, step_key))
    return state, metrics.add_step(loss_sum, correct, mask)

  zero = jnp.zeros((), jnp.float32)
  init = (state, LocalMetrics(zero, zero, zero, zero))
  state, metrics = run_schedule_steps(train_step, init, data.num_examples, max_examples, schedule)
  num_steps = num_real_steps(data.num_examples, max_examples, schedule)
  return variant.client_final(inputs, state, num_steps), metrics


def optimizer_step(optimizer: optax.GradientTransformation, grads: PyTree, opt_state: Any,
                   params: PyTree, scale: jax.Array | None = None) -> tuple[PyTree, Any]:
  """(params, opt_state) after one `optimizer` step on `grads`.

  `scale` ([] float, optional) multiplies the updates: a learning-rate multiplier set from
  outside the optimizer (e.g. a schedule over rounds while the optimizer restarts every
  round); its state is advanced as without it.
  """
  updates, opt_state = optimizer.update(grads, opt_state, params)
  if scale is not None:
    updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)
  return optax.apply_updates(params, updates), opt_state


def make_local_train(apply_fn: Callable, optimizer: optax.GradientTransformation,
                     schedule: LocalSchedule, *, loss_fn: LossFn = softmax_cross_entropy,
                     train_transform: TransformFn | None = None,
                     penalty_fn: PenaltyFn | None = None,
                     lowrank: LowRankDense | None = None) -> Callable:
  """Builds `local_train` for one client (write one client; the engine maps it).

  Plain, masked, penalised (FedProx) and low-rank local training are variants
  (`LocalVariant`) of the one local-training loop, `run_local`.

  Args:
    apply_fn: `apply_fn(params, batch_stats, x, *, train, example_mask) -> (logits, batch_stats)`.
    optimizer: client optimizer (optax); its state is re-initialised each round
      unless `opt_state` is passed.
    schedule: batch size and number of local epochs/steps.
    loss_fn: per-example loss `(logits [B, K], y [B]) -> [B]`.
    train_transform: per-batch augmentation `(x [B, ...], key) -> x`, inside jit.
    penalty_fn: optional regulariser `(params, penalty_state) -> []` added to the
      mean batch loss (FedProx's proximal term, variational pruning costs...).
    lowrank: optional `LowRankDense`: the kernels of its layers are trained by SGD at
      its learning rate and momentum and held as factors (`performance.LowRankDense`): the
      returned params hold a `FactoredKernel(base, left, right)` for each, and
      `optimizer` (its state, `opt_state`) covers the other parameters only. Needs an
      apply_fn that takes `dense_lowrank` (`models.make_apply` of an MLPSpec or
      ConvNetSpec); no masks, no penalty_fn. Same training as `optax.sgd(lr,
      momentum=momentum or None)` on every parameter when `optimizer` is that.

  Returns:
    `local_train(params, batch_stats, data, key, *, masks=None, penalty_state=None,
    opt_state=None) -> (LocalState, LocalMetrics)` where `data` is one client's
    `ClientData` (x [E, ...], y [E], num_examples []). With `masks`, gradients
    and parameters are masked every step, so pruned weights stay exactly zero.
  """
  if lowrank is not None and penalty_fn is not None:
    raise ValueError("lowrank (factored dense kernels) cannot be combined with a penalty_fn: "
                     "the penalty's gradient on those kernels is not held as factors")
  if lowrank is not None:
    variant = lowrank.local_variant(apply_fn, optimizer, schedule, loss_fn)
  else:
    variant = _dense_variant(apply_fn, optimizer, loss_fn, penalty_fn)

  def local_train(params: Params, batch_stats: BatchStats, data: ClientData, key: PRNGKey, *,
                  masks: Masks | None = None, penalty_state: Any = None,
                  opt_state: Any = None) -> tuple[LocalState, LocalMetrics]:
    if lowrank is not None:
      if masks is not None:
        raise ValueError("lowrank (factored dense kernels) trains dense models: pass masks=None")
      inputs = lowrank.local_inputs(params, batch_stats, opt_state, schedule, data.x.shape[0])
    else:
      inputs = _DenseInputs(params, batch_stats, masks, penalty_state, opt_state)
    return run_local(variant, inputs, data, key, schedule, train_transform)

  return local_train


class _DenseInputs(NamedTuple):
  params: Params
  batch_stats: BatchStats
  masks: Masks | None       # pruned weights and their gradients held at zero
  penalty_state: Any        # penalty_fn's second argument (FedProx: the server's params)
  opt_state: Any            # None: optimizer.init(params)


def _dense_variant(apply_fn: Callable, optimizer: optax.GradientTransformation, loss_fn: LossFn,
                   penalty_fn: PenaltyFn | None) -> LocalVariant:
  """Every parameter trained by `optimizer`; optionally masked, optionally penalised."""

  def batch_loss(p, stats, x, y, mask, penalty_state):
    logits, new_stats = apply_fn(p, stats, x, train=True, example_mask=mask)
    loss, loss_sum, correct = masked_batch_loss(loss_fn, logits, y, mask)
    if penalty_fn is not None:
      loss = loss + penalty_fn(p, penalty_state)
    return loss, (new_stats, loss_sum, correct)

  grad_fn = jax.value_and_grad(batch_loss, has_aux=True)

  def client_init(inputs: _DenseInputs) -> LocalState:
    params = inputs.params if inputs.masks is None else masks_lib.apply(inputs.params, inputs.masks)
    opt_state = optimizer.init(params) if inputs.opt_state is None else inputs.opt_state
    return LocalState(params, inputs.batch_stats, opt_state)

  def client_step(inputs: _DenseInputs, state: LocalState, batch: StepInput):
    masks = inputs.masks
    (_, (new_stats, loss_sum, correct)), grads = grad_fn(
        state.params, state.batch_stats, batch.x, batch.y, batch.mask, inputs.penalty_state)
    if masks is not None:
      grads = masks_lib.apply(grads, masks)
    new_params, new_opt = optimizer_step(optimizer, grads, state.opt_state, state.params)
    if masks is not None:
      new_params = masks_lib.apply(new_params, masks)
    return LocalState(new_params, new_stats, new_opt), loss_sum, correct

  return LocalVariant(client_init, client_step, lambda inputs, state, num_steps: state)


def masked_batch_loss(loss_fn: LossFn, logits: jax.Array, y: jax.Array, mask_B: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mean loss over the real examples, summed loss, correct count) of one batch; padding
  examples (mask False) count for nothing, and an all-padding batch has loss 0."""
  per_example = loss_fn(logits, y)
  weights = mask_B.astype(per_example.dtype)
  loss_sum = jnp.sum(per_example * weights)
  return loss_sum / jnp.maximum(jnp.sum(weights), 1.0), loss_sum, count_correct(logits, y, weights)


def count_correct(logits: jax.Array, y: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted number of argmax hits; 0 when targets are not class labels [B]."""
  if y.shape != logits.shape[:-1] or not jnp.issubdtype(y.dtype, jnp.integer):
    return jnp.zeros((), jnp.float32)
  return jnp.sum((first_argmax(logits) == y) * weights)


def first_argmax(logits: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, -1)` (the first index of the maximum) as two plain reductions.

  `jnp.argmax` lowers to one reduction over (value, index) pairs, which XLA:CPU
  runs as a scalar loop: ~8 us per [32, 62] batch, more than the rest of a small
  model's loss (profiled in a one-client MLP round). A max, then the smallest
  index holding it, vectorise. Differs only on rows holding a NaN: they get
  index K (matching no label) where argmax returns the NaN's index.
  """
  num_classes = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.min(jnp.where(logits == top, index, num_classes), axis=-1)


def proximal_penalty(mu: float) -> PenaltyFn:
  """FedProx's term mu/2 * ||w - w_global||^2; `penalty_state` is w_global."""
  if mu < 0:
    raise ValueError(f"prox mu must be >= 0, got {mu}")

  def penalty(params, anchor):
    return 0.5 * mu * tree_lib.squared_norm(tree_lib.sub(params, anchor))

  return penalty
