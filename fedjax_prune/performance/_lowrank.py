"""Dense-layer client updates held as factors: local SGD without per-client dense kernels.

With SGD, a dense kernel's gradient at a step is `x^T g` (layer input x [B, in],
output gradient g [B, out]), so after t local steps of plain SGD a client's kernel is

    W_client = W_server + left^T right,   left = [x_0; ...; x_{t-1}]  [t*B, in],
                                           right = -lr [g_0; ...; g_{t-1}]  [t*B, out].

The client never forms W_client: its forward pass computes x W_server + (x left^T) right
(`models` apply_fn's `dense_lowrank`). For the LEAF CNN's 3136 x 2048 layer and 4 steps of
32 examples the factors hold 0.66 M numbers instead of 6.4 M, the per-step weight-gradient
GEMM (reduction over only B = 32 rows) and the per-step read-modify-write of the 26 MB
kernel disappear, and the server's FedAvg aggregate of all clients becomes ONE GEMM over
the cohort's stacked factors (reduction over C * S * B rows) instead of C per-client
kernels. Exact (same SGD trajectory up to float rounding), for layers trained by SGD
(plain or with heavy-ball momentum: each row's weight then depends on how many steps ago it
was added) at a constant learning rate, without masks or a penalty on their kernel.

`LowRankSum` is how a client hands such a delta to the engine: a `ClientOutput.sums`
leaf that the engine sums over the cohort as the dense matrix `sum_k left_k^T right_k`
(its `sum_over_clients`). The engine core knows none of this: `federated.fedavg(...,
lowrank=LowRankDense(...))` asks the `LowRankDense` for its local-training variant
(`local_variant`, a `federated` `LocalVariant`), and the engine sums any leaf that has
`dense()` and `sum_over_clients()` its own way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_prune.federated._local import (LocalSchedule, LocalState, LocalVariant, LossFn, StepInput,
                                           masked_batch_loss, optimizer_step)
from fedjax_prune.types import BatchStats, Params


@dataclasses.dataclass(frozen=True)
class LowRankDense:
  """Which dense kernels a client trains as factors, and their SGD learning rate and momentum.

  Attributes:
    layers: names of dense layers (`'dense_{j}'` of an MLPSpec/ConvNetSpec model)
      whose kernels are held as server kernel + left^T right during local training.
      `worthwhile_lowrank_layers` picks those for which this saves memory.
    learning_rate: the clients' SGD learning rate (the same as the client
      optimizer's, which trains every other parameter: `optax.sgd(learning_rate,
      momentum=momentum or None)` gives a run identical to the dense one).
    rows: factor rows per client; None = local steps x batch size of the schedule
      (the most any client fills). A larger value pads the factors with zero rows:
      same results, at the cost of the run it was taken from (the experiments'
      strategy calibration times a 2-step round with the full run's rows, since the
      correction `(x left^T) right` costs in proportion to the rows).
    momentum: the clients' SGD (heavy-ball, optax `trace`) momentum, 0 for plain SGD.
      With momentum the kernel after t steps is still the server kernel plus
      sum_i x_i^T g_i weighted by -lr (1 - momentum^(t-i)) / (1 - momentum): the factors
      keep the raw rows and the weights are recomputed from t (no momentum buffer).
  """
  layers: tuple[str, ...]
  learning_rate: float
  rows: int | None = None
  momentum: float = 0.0

  def __post_init__(self):
    if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
      raise ValueError(f"layers must be a tuple of layer names, got {self.layers!r}")
    object.__setattr__(self, "layers", tuple(self.layers))
    if not self.layers:
      raise ValueError("LowRankDense needs at least one layer name")
    if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be a number > 0, got {self.learning_rate!r}")
    if not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
    if self.rows is not None and (not isinstance(self.rows, int) or isinstance(self.rows, bool)
                                  or self.rows < 1):
      raise ValueError(f"rows must be None or an int >= 1, got {self.rows!r}")

  def check_optimizer(self, optimizer: Any) -> None:
    """Raises ValueError unless `optimizer` is this SGD (`check_optimizer_is_sgd`)."""
    check_optimizer_is_sgd(optimizer, self)

  def local_variant(self, apply_fn: Callable, optimizer: optax.GradientTransformation,
                    schedule: LocalSchedule, loss_fn: LossFn) -> LocalVariant:
    """The local-training variant (`federated.make_local_train(..., lowrank=self)`)."""
    return _lowrank_variant(apply_fn, optimizer, schedule, loss_fn, self)

  def local_inputs(self, params: Params, batch_stats: BatchStats, opt_state: Any,
                   schedule: LocalSchedule, max_examples: int) -> "_LowRankInputs":
    """The variant's inputs for one client whose padded example axis is `max_examples`."""
    # Factor rows: the most a client fills, or more (zero rows: a calibration round priced
    # at a longer run's size).
    rows = max(schedule.total_steps(max_examples) * schedule.batch_size, self.rows or 0)
    return _LowRankInputs(params, batch_stats, opt_state, rows)


def check_optimizer_is_sgd(optimizer: Any, lowrank: LowRankDense) -> None:
  """Raises ValueError unless `optimizer` updates as `optax.sgd(lowrank.learning_rate,
  momentum=lowrank.momentum or None)` does.

  Factored kernels are trained by that SGD whatever the client optimizer is, so a
  run with another optimizer (Adam, another learning rate or momentum, a schedule,
  weight decay, clipping) would silently differ from the dense run it stands for.
  optax transformations are opaque, so the check is behavioural: three updates of a
  2-vector probe (params and gradients chosen so that these alternatives all differ
  from SGD, at trace time, eagerly) against the SGD recurrence.
  """
  lr, momentum = lowrank.learning_rate, lowrank.momentum
  with jax.ensure_compile_time_eval():
    params = jnp.array([0.5, -1.0], jnp.float32)
    grads = [jnp.array(g, jnp.float32) for g in ([2.0, -0.5], [-0.25, 1.5], [1.0, 3.0])]
    state = optimizer.init(params)
    trace = jnp.zeros_like(params)
    for step, g in enumerate(grads):
      updates, state = optimizer.update(g, state, params)
      trace = g + momentum * trace
      expected = -lr * trace
      if not bool(jnp.allclose(updates, expected, rtol=1e-5, atol=1e-7)):
        raise ValueError(
            f"lowrank trains its dense kernels by SGD (learning_rate={lr}, momentum={momentum}), "
            f"but the client optimizer updates differently (step {step + 1} of a probe: "
            f"{updates.tolist()} instead of {expected.tolist()}); use optax.sgd({lr}"
            f"{f', momentum={momentum}' if momentum else ''}) as the client optimizer or drop "
            "lowrank")


def row_weights(rows: int, batch_size: int, steps_taken: jax.Array, learning_rate: float,
                momentum: float) -> jax.Array:
  """[rows] weights of the factor rows after `steps_taken` local SGD steps: row r holds an
  example of step i = r // batch_size, and the kernel is base + left^T (weights * grads) with

      weight_r = -lr * (1 - momentum^(t - i)) / (1 - momentum)   if i < t, else 0

  (heavy-ball momentum: the gradient of step i has entered t - i updates, with factors
  1, momentum, momentum^2, ...; plain SGD: -lr for every step taken)."""
  step_of_row = jnp.arange(rows) // batch_size
  age = jnp.asarray(steps_taken, jnp.int32) - step_of_row
  taken = age > 0
  if momentum == 0.0:
    scale = jnp.ones((rows,), jnp.float32)
  else:
    scale = (1.0 - jnp.power(jnp.float32(momentum), jnp.maximum(age, 0).astype(jnp.float32))) / (
        1.0 - momentum)
  return jnp.where(taken, -learning_rate * scale, 0.0)


class LowRankSum(NamedTuple):
  """A [in, out] matrix held as `left^T @ right` (left [R, in], right [R, out]).

  As a leaf of `ClientOutput.sums`, the engine adds it up over the cohort as dense
  matrices (under `Vmap` one GEMM over all clients' rows: `sum_over_clients`).
  """
  left: jax.Array
  right: jax.Array

  def dense(self) -> jax.Array:
    """The [in, out] matrix."""
    return self.left.T @ self.right

  def sum_over_clients(self) -> jax.Array:
    """Stacked over clients (left [C, R, in], right [C, R, out]): the [in, out] sum of
    their dense matrices, as one GEMM contracting clients and rows."""
    return jnp.einsum("cri,cro->io", self.left, self.right)


class FactoredKernel(NamedTuple):
  """A client's dense kernel after local training: `base + left^T @ right`.

  `make_local_train(..., lowrank=...)` returns these in place of the trained kernels
  of the factored layers; `base` is the server kernel it started from (not copied).
  """
  base: jax.Array   # [in, out]
  left: jax.Array   # [R, in]: the layer's inputs at each local step
  right: jax.Array  # [R, out]: -lr * the gradients with respect to its outputs

  def dense(self) -> jax.Array:
    """The [in, out] kernel."""
    return self.base + self.left.T @ self.right

  def weighted_delta(self, weight: jax.Array) -> LowRankSum:
    """weight * (base - kernel) = `LowRankSum(weight * left, -right)`: a client's
    pre-weighted FedAvg delta from the server kernel `base`, without forming it."""
    return LowRankSum(self.left * weight.astype(self.left.dtype), -self.right)


def worthwhile_lowrank_layers(params: Mapping, rows: int, *, min_saving: float = 2.0) -> tuple[str, ...]:
  """The dense layers whose kernels are cheaper as factors over `rows` rows.

  Args:
    params: the model's params (or `models.param_shapes(spec)[0]`); dense layers are
      the top-level entries named 'dense_{j}' with a 2-D 'kernel'.
    rows: factor rows per client = local steps x batch size (the most any client takes:
      `schedule.total_steps(max_examples) * schedule.batch_size`).
    min_saving: factor a kernel only when in * out >= min_saving * rows * (in + out).

  Returns:
    Layer names, in order (empty when none pays off).
  """
  if rows < 1:
    raise ValueError(f"rows must be >= 1, got {rows}")
  out = []
  for name in sorted(params, key=lambda n: (len(n), n)):
    layer = params[name]
    if not (name.startswith("dense_") and isinstance(layer, Mapping) and "kernel" in layer):
      continue
    shape = tuple(layer["kernel"].shape)
    if len(shape) == 2 and shape[0] * shape[1] >= min_saving * rows * (shape[0] + shape[1]):
      out.append(name)
  return tuple(out)


class _LowRankInputs(NamedTuple):
  params: Params
  batch_stats: BatchStats
  opt_state: Any  # of the parameters other than the factored kernels; None: optimizer.init
  rows: int       # static: factor rows per client


def _lowrank_variant(apply_fn: Callable, optimizer: optax.GradientTransformation,
                     schedule: LocalSchedule, loss_fn: LossFn, lowrank: LowRankDense
                     ) -> LocalVariant:
  """The kernels of `lowrank.layers` held as server kernel + factors (module docstring);
  `optimizer` trains every other parameter."""
  batch_size = schedule.batch_size

  def bases_of(inputs: _LowRankInputs) -> dict:
    return {name: inputs.params[name]["kernel"] for name in lowrank.layers}

  def full_params(p, bases):
    return {name: ({**sub, "kernel": bases[name]} if name in bases else sub) for name, sub in p.items()}

  def weighted(factors, steps_taken, rows):
    weights = row_weights(rows, batch_size, steps_taken, lowrank.learning_rate, lowrank.momentum)
    return {name: (left, weights[:, None].astype(grads.dtype) * grads)
            for name, (left, grads) in factors.items()}

  def batch_loss(p, probes, stats, factors, bases, x, y, mask):
    lowrank_in = {name: (left, right, probes[name]) for name, (left, right) in factors.items()}
    logits, new_stats, layer_inputs = apply_fn(full_params(p, bases), stats, x, train=True,
                                               example_mask=mask, dense_lowrank=lowrank_in)
    loss, loss_sum, correct = masked_batch_loss(loss_fn, logits, y, mask)
    return loss, (new_stats, layer_inputs, loss_sum, correct)

  grad_fn = jax.value_and_grad(batch_loss, argnums=(0, 1), has_aux=True)

  def client_init(inputs: _LowRankInputs):
    params = inputs.params
    for name in lowrank.layers:
      if name not in params or "kernel" not in params[name] or jnp.ndim(params[name]["kernel"]) != 2:
        raise ValueError(f"lowrank layer {name!r} is not a dense layer of these params "
                         f"(top-level entries: {sorted(params)})")
    bases = bases_of(inputs)
    # Every parameter but the factored kernels: what the optimizer and the gradient see.
    rest = {name: ({k: v for k, v in sub.items() if k != "kernel"} if name in bases else sub)
            for name, sub in params.items()}
    opt_state = optimizer.init(rest) if inputs.opt_state is None else inputs.opt_state
    # Factors: the layer inputs (left) and the raw output gradients (grads) of every step,
    # one row per example; the kernel after t steps is base + left^T (row_weights(t) * grads).
    # The buffers start as zeros. The barrier keeps XLA from treating them as
    # constants: with constant zero factors under jit + vmap, XLA:CPU (jax 0.10.2)
    # returned NaN gradients for the convolutions below them.
    factors = jax.lax.optimization_barrier(
        {name: (jnp.zeros((inputs.rows, w.shape[0]), w.dtype),
                jnp.zeros((inputs.rows, w.shape[1]), w.dtype)) for name, w in bases.items()})
    return rest, inputs.batch_stats, opt_state, factors

  def client_step(inputs: _LowRankInputs, state, batch: StepInput):
    p, stats, opt, factors = state
    bases = bases_of(inputs)
    probes = {name: jnp.zeros((batch_size, w.shape[1]), w.dtype) for name, w in bases.items()}
    (_, (new_stats, layer_inputs, loss_sum, correct)), (grads, probe_grads) = grad_fn(
        p, probes, stats, weighted(factors, batch.real_step, inputs.rows), bases, batch.x,
        batch.y, batch.mask)
    new_p, new_opt = optimizer_step(optimizer, grads, opt, p)
    # This step's kernel gradient is layer_inputs^T probe_grads: append the pair as rows.
    row = batch.real_step * batch_size
    new_factors = {
        name: (jax.lax.dynamic_update_slice(left, layer_inputs[name].astype(left.dtype), (row, 0)),
               jax.lax.dynamic_update_slice(g, probe_grads[name].astype(g.dtype), (row, 0)))
        for name, (left, g) in factors.items()}
    return (new_p, new_stats, new_opt, new_factors), loss_sum, correct

  def client_final(inputs: _LowRankInputs, state, num_steps: jax.Array) -> LocalState:
    p, stats, opt, factors = state
    bases = bases_of(inputs)
    final = weighted(factors, num_steps, inputs.rows)
    trained = {name: ({**sub, "kernel": FactoredKernel(bases[name], *final[name])}
                      if name in bases else sub) for name, sub in p.items()}
    return LocalState(trained, stats, opt)

  return LocalVariant(client_init, client_step, client_final)
