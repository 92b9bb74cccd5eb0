"""FedRolex: rolling width submodels (Alam et al., NeurIPS 2022).

In round t a width-r client keeps channels {(t + j) mod C : j < ceil(r C)} of
every hidden layer (`channel_keep(C, r, offset=t)`); otherwise as HeteroFL
(partial averaging, static BN, scaler). Shared machinery in
`_width_submodels.width_method`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import optax

from fedjax_prune import federated
from fedjax_prune.federated import LocalSchedule, softmax_cross_entropy
from fedjax_prune.pruning import _hetero
from fedjax_prune.pruning._hetero import HeteroMethod
from fedjax_prune.pruning._width_submodels import (INPUT_KEYS, OUTPUT_KEYS, channel_keep, width_masks,
                                                   width_method)

__all__ = ["fedrolex_method", "channel_keep", "fedrolex", "width_masks"]


def fedrolex(apply_fn: Callable, client_optimizer: optax.GradientTransformation,
             schedule: LocalSchedule, *, capacities: Sequence[float],
             widths: Sequence[float] | None = None, scaler: bool = True,
             server_learning_rate: float = 1.0, loss_fn: Callable = softmax_cross_entropy,
             train_transform: Callable | None = None, input_keys: str = INPUT_KEYS,
             output_keys: str = OUTPUT_KEYS) -> HeteroMethod:
  """FedRolex: HeteroFL with a rolling channel window (offset = round index mod C).

  Arguments as `heterofl`. Evaluation uses the window of the last round trained.

  References:
    Alam, Liu, Yan, Zhang, FedRolex: Model-Heterogeneous Federated Learning
    with Rolling Sub-Model Extraction, NeurIPS 2022.
  """
  return width_method(apply_fn, client_optimizer, schedule, capacities=capacities, widths=widths,
                      rolling=True, scaler=scaler, server_learning_rate=server_learning_rate,
                      loss_fn=loss_fn, train_transform=train_transform, input_keys=input_keys,
                      output_keys=output_keys)


def fedrolex_method(hetero: HeteroMethod, **kwargs) -> federated.Method:
  """FedRolex end to end: `fedrolex(...)`'s algorithm, evaluated per capacity level. Nothing runs
  between rounds (every client's submodel is derived inside the compiled round).

  Args:
    hetero: `fedrolex(...)`.
    **kwargs: `_hetero.submodel_method`'s keyword arguments (spec, params, batch_stats,
      key, eval_apply, test, client_caps, capacities, sweep, sweep_every, num_rounds).
  """
  return _hetero.submodel_method(hetero, **kwargs)
