"""Type aliases used across fedjax_prune (aliases only, no logic)."""
from typing import Any, Mapping

import jax

PyTree = Any
Params = Mapping[str, Any]      # nested dict of jax.Array (nnx.State.to_pure_dict() form)
BatchStats = Mapping[str, Any]  # nested dict of BatchNorm running statistics ({} when none)
Masks = Any                     # same structure as Params, bool leaves broadcastable to the param
PRNGKey = jax.Array             # from jax.random.key(seed)
Metrics = Mapping[str, jax.Array]
