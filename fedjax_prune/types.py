"""Type aliases and protocols used across fedjax_prune (no logic)."""
from typing import Any, Mapping, Protocol

import jax

PyTree = Any
Params = Mapping[str, Any]      # nested dict of jax.Array (nnx.State.to_pure_dict() form)
BatchStats = Mapping[str, Any]  # nested dict of BatchNorm running statistics ({} when none)
Masks = Any                     # same structure as Params, bool leaves broadcastable to the param
PRNGKey = jax.Array             # from jax.random.key(seed)
Metrics = Mapping[str, jax.Array]


class ApplyFn(Protocol):
  """A model's forward pass, as `models.make_apply` builds it and every algorithm takes it:
  `apply_fn(params, batch_stats, x [B, ...], *, train, example_mask=None, **kw)
  -> (logits [B, K], batch_stats)`. Extra keywords are the model's own (`gates`,
  `dense_lowrank`)."""

  def __call__(self, params: Any, batch_stats: Any, x: jax.Array, *, train: bool,
               **kwargs: Any) -> tuple[jax.Array, Any]: ...
