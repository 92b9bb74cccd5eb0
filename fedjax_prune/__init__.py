"""fedjax_prune: federated learning with model pruning, one compiled round over a stacked client axis.

The public API is the subpackages and modules listed in `__all__`; each lists its
own public names in its `__all__`. Modules and subpackages whose names start with
`_` are private. `fedjax_prune.testing` (tiny models and data for tests and
notebooks) is imported on its own.
"""
__version__ = "0.1.0"

# Importing these brings in JAX, Flax and optax, nothing heavier: orbax (checkpoint),
# tensorflow_datasets and h5py (data loaders) are imported inside the functions that
# need them. Importing fedjax_prune does not initialise a JAX backend.
from fedjax_prune import (data, federated, masks, models, performance, pruning, structured, accounting,
                          checkpoint, tree, types)

__all__ = [
    "__version__",
    "accounting",
    "checkpoint",
    "data",
    "federated",
    "masks",
    "models",
    "performance",
    "pruning",
    "structured",
    "tree",
    "types",
]
