"""ScaleFL: width + depth submodels with early exits and self-distillation (Ilhan et al., CVPR 2023).

Use with `models.make_early_exit_apply` / `models.build_early_exit`. A level is a
(width r, depth d) pair: the client trains stages 1..d at width r and the exits up to
d, distilling its deepest exit into the earlier ones. The level rule
(`scalefl_levels`), the distillation loss form and weights are inferred (the
paper's method section and code were not read) and exposed as options. Shared
width machinery in `_width_submodels.width_method`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_prune import federated
from fedjax_prune.federated import LocalSchedule
from fedjax_prune.masks._filters import path_str
from fedjax_prune.pruning import _hetero
from fedjax_prune.pruning._hetero import HeteroMethod
from fedjax_prune.pruning._width_submodels import (_EXIT, GroupedExecution, depth_masks, leaf_stages,
                                                   width_method)
from fedjax_prune.types import Params

__all__ = ["GroupedExecution", "scalefl_method", "depth_masks", "leaf_stages", "scalefl", "scalefl_levels", "self_distillation_loss",
           "stage_param_fractions"]


def stage_param_fractions(params: Params) -> tuple[float, ...]:
  """Fraction of the parameters in stem + stages 1..d (with its exit/head), d = 1..S."""
  stages = jax.tree.leaves(leaf_stages(params))
  sizes = [int(np.prod(np.shape(p))) for p in jax.tree.leaves(params)]
  paths = [path_str(p).split("/")[0] for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  num_stages = max(stages)
  total = sum(s for s, t in zip(sizes, paths) if not _EXIT.match(t))
  out = []
  for d in range(1, num_stages + 1):
    body = sum(z for z, s, t in zip(sizes, stages, paths)
               if s <= d and not _EXIT.match(t) and t != "head")
    head = sum(z for z, s, t in zip(sizes, stages, paths)
               if (t == "head" and d == num_stages) or (_EXIT.match(t) and s == d))
    out.append((body + head) / total)
  return tuple(out)


def scalefl_levels(params: Params, capacities: Sequence[float], *, min_depth: int = 2
                   ) -> tuple[tuple[float, ...], tuple[int, ...]]:
  """Default (widths, depths) per capacity (inferred rule, documented option).

  Depth d = the fewest stages (>= min_depth) whose full-width parameter
  fraction f_d reaches the capacity, then width r = sqrt(capacity / f_d) so
  that the submodel holds about `capacity` of the parameters.
  """
  caps = _hetero.check_capacities(capacities)
  fractions = stage_param_fractions(params)
  widths, depths = [], []
  for c in caps:
    d = next((i + 1 for i, f in enumerate(fractions) if i + 1 >= min_depth and f >= c - 1e-9),
             len(fractions))
    widths.append(min(1.0, math.sqrt(c / fractions[d - 1])))
    depths.append(d)
  return tuple(widths), tuple(depths)


def self_distillation_loss(depth, num_exits: int, *, alpha: float = 0.5,
                           temperature: float = 3.0) -> Callable:
  """ScaleFL's client loss for a depth-`depth` submodel (inferred form).

  Per used exit e < d: (1 - alpha) * CE(z_e, y) + alpha * T^2 * KL(softmax(z_d / T) ||
  softmax(z_e / T)) with the deepest used exit z_d as a stop-gradient teacher;
  exit d itself: CE. Averaged over the d used exits. Exits after d get no loss.

  Args:
    depth: [] int, number of stages of the submodel (its deepest exit is d - 1,
      0-based), may be traced.
    num_exits: X, the model's number of exits.
    alpha: distillation weight in [0, 1].
    temperature: T > 0.

  Returns:
    `loss(logits [B, X, K], y [B]) -> [B]`.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"distillation alpha must lie in [0, 1], got {alpha}")
  if not temperature > 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")

  def loss(logits_BxXxK, y_B):
    d = jnp.asarray(depth, jnp.int32)
    ce_BxX = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxXxK, jnp.broadcast_to(y_B[:, None], logits_BxXxK.shape[:2]))
    teacher_BxK = jax.lax.stop_gradient(
        jnp.take(logits_BxXxK, d - 1, axis=1) / temperature)
    t_logp = jax.nn.log_softmax(teacher_BxK, axis=-1)
    s_logp = jax.nn.log_softmax(logits_BxXxK / temperature, axis=-1)
    kl_BxX = jnp.sum(jnp.exp(t_logp)[:, None, :] * (t_logp[:, None, :] - s_logp), axis=-1)
    exits = jnp.arange(num_exits)
    per_exit = jnp.where(exits[None, :] == d - 1, ce_BxX,
                         (1.0 - alpha) * ce_BxX + alpha * temperature ** 2 * kl_BxX)
    used = (exits < d).astype(per_exit.dtype)
    return jnp.sum(per_exit * used[None, :], axis=1) / d.astype(per_exit.dtype)

  return loss


def scalefl(apply_fn: Callable, client_optimizer: optax.GradientTransformation,
            schedule: LocalSchedule, *, capacities: Sequence[float], widths: Sequence[float],
            depths: Sequence[int], num_exits: int, scaler: bool = True,
            distill_alpha: float = 0.5, temperature: float = 3.0,
            server_learning_rate: float = 1.0,
            train_transform: Callable | None = None,
            grouped: GroupedExecution | None = None,
            aggregator: federated.Aggregator | None = None,
            level_clients: Sequence[int] | None = None) -> HeteroMethod:
  """ScaleFL: width + depth submodels with early exits and self-distillation.

  Args:
    apply_fn: early-exit model apply returning logits [B, X, K]
      (`models.make_early_exit_apply` with exits after stages 1..X-1).
    client_optimizer: local optimizer.
    schedule: local steps.
    capacities: L capacity levels.
    widths: width ratio per level (see `scalefl_levels` for the default rule).
    depths: number of stages per level (1..X); the level's exit is depth - 1.
    num_exits: X.
    scaler: 1/r on the classifier inputs, in training and in the evaluated submodel alike.
    distill_alpha, temperature: self-distillation (`self_distillation_loss`).
    server_learning_rate: applied to the averaged update.
    train_transform: per-batch augmentation.
    grouped: None (default: every client runs the full-size early-exit model under its
      level's width and depth masks) or `GroupedExecution(spec, apply_for)` with the
      backbone ResNetSpec and `apply_for(level_spec, exit_stages)` (e.g.
      `models.make_early_exit_apply`): each level trains its really-smaller model, the
      first d stages at width r with exit d as its head, one program per level (the
      same new global params up to float summation order; `heterofl`'s `grouped`).
    aggregator, level_clients: `heterofl`'s (a level holds its width and depth: its
      stages and exits).

  Returns:
    HeteroMethod; `submodel` returns the level's exit index (depth - 1).

  References:
    Ilhan, Su, Liu, ScaleFL: Resource-Adaptive Federated Learning with
    Heterogeneous Clients, CVPR 2023. The level rule, the distillation form and
    its weights are inferred (the paper's method section and code were not read):
    options, not the paper's numbers.
  """
  if any(not 1 <= int(d) <= num_exits for d in depths):
    raise ValueError(f"depths must lie in [1, num_exits={num_exits}], got {tuple(depths)}")
  return width_method(
      apply_fn, client_optimizer, schedule, capacities=capacities, widths=widths, depths=depths,
      rolling=False, scaler=scaler, server_learning_rate=server_learning_rate,
      loss_fn_for_depth=lambda d: self_distillation_loss(d, num_exits, alpha=distill_alpha,
                                                         temperature=temperature),
      exit_index_for_depth=lambda d: jnp.asarray(d, jnp.int32) - 1,
      train_transform=train_transform, grouped=grouped, exit_stages=tuple(range(1, num_exits)),
      aggregator=aggregator, level_clients=level_clients)


def scalefl_method(hetero: HeteroMethod, **kwargs) -> federated.Method:
  """ScaleFL end to end: `scalefl(...)`'s algorithm, evaluated per capacity level. Nothing runs
  between rounds (every client's submodel is derived inside the compiled round).

  Args:
    hetero: `scalefl(...)`.
    **kwargs: `_hetero.submodel_method`'s keyword arguments (spec, params, batch_stats,
      key, eval_apply, test, client_caps, capacities, sweep, sweep_every, num_rounds).
  """
  return _hetero.submodel_method(hetero, **kwargs)
