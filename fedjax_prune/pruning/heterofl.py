"""HeteroFL: static width-prefix submodels with partial averaging (Diao et al., ICLR 2021).

A width-r client trains the first ceil(r C) channels of every hidden layer of the
one full-size global model (`width_masks` with offset 0: a static prefix); the server
averages each coordinate over the clients that hold it; BatchNorm is static (batch
statistics at train and test time); the scaler multiplies the classifier input by
1/r in training. The submodel machinery is shared with FedRolex and ScaleFL
(`_width_submodels.width_method`). Text models (`spec=` a TransformerSpec or LSTMSpec):
the widths are attention heads, FFN units and LSTM units (`text_width_masks`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import optax

from fedjax_prune import federated
from fedjax_prune.federated import LocalSchedule, softmax_cross_entropy
from fedjax_prune.pruning import _hetero
from fedjax_prune.pruning._hetero import HeteroMethod
from fedjax_prune.pruning._width_submodels import (INPUT_KEYS, NO_KEYS, OUTPUT_KEYS, GroupedExecution,
                                                   channel_keep, grouped_level_specs, keep_count,
                                                   sqrt_widths, text_width_masks, text_widths,
                                                   width_masks, width_method)

__all__ = ["GroupedExecution", "heterofl_method", "channel_keep", "grouped_level_specs", "heterofl",
           "keep_count", "sqrt_widths", "text_width_masks", "text_widths", "width_masks"]


def heterofl(apply_fn: Callable, client_optimizer: optax.GradientTransformation,
             schedule: LocalSchedule, *, capacities: Sequence[float],
             widths: Sequence[float] | None = None, scaler: bool = True,
             server_learning_rate: float = 1.0, loss_fn: Callable = softmax_cross_entropy,
             train_transform: Callable | None = None, input_keys: str = INPUT_KEYS,
             output_keys: str = OUTPUT_KEYS, flatten_keys: str = NO_KEYS,
             spec=None, grouped: GroupedExecution | None = None,
             aggregator: federated.Aggregator | None = None,
             level_clients: Sequence[int] | None = None) -> HeteroMethod:
  """HeteroFL: static width-prefix submodels, partial averaging, static BN, scaler.

  Args:
    apply_fn: full-size model apply (use norm='batch_static').
    client_optimizer: local optimizer.
    schedule: local steps.
    capacities: L capacity levels (parameter fractions, as FIARSE's).
    widths: width ratio per level (default sqrt(capacity), so 1/4 -> width 1/2).
    scaler: multiply the classifier input by 1/r, in training and in the evaluated
      submodel alike (`_width_submodels` module docstring).
    server_learning_rate: applied to the averaged update (1.0 = HeteroFL's plain average).
    loss_fn: per-example loss.
    train_transform: per-batch augmentation.
    input_keys: regex of top-level param keys reading the unsliced input (ResNet: stem).
    output_keys: regex of top-level param keys producing the unsliced classes (ResNet: head).
    flatten_keys: regex of top-level param keys whose input is a flattened conv feature map
      (LEAF CNN: dense_0); its inputs are kept by channel (`width_masks`).
    spec: None, or a text model's LSTMSpec / TransformerSpec: the width-r submodel keeps
      ceil(r W) of the units of every structured group (attention heads with their
      q/k/v/o slices, FFN units, LSTM units; d_model, embeddings, LayerNorms and the
      head full), `text_width_masks`; widths default to `text_widths` (r = capacity for
      a transformer); the `*_keys` arguments do not apply. `_width_submodels` module
      docstring says why d_model stays full.
    grouped: how clients run their submodels: None (default) = every client runs the
      full-size model under its level's channel masks (one program for every level);
      `GroupedExecution(spec, apply_for)` = each capacity level trains its really-smaller
      width-sliced model (one program per level, the client's chosen by its level), with
      its update scattered back to full shape: the same new global params up to float
      summation order, faster where clients run one at a time (`federated.Sequential()`,
      the CPU default); see `GroupedExecution`. Not for text models.
    aggregator: None: each coordinate's mean over the clients holding it. A
      `federated.Aggregator` (robust, DP, compressed) gets each client's update on the
      coordinates its submodel holds (`_hetero.counted_view`: DP clips them, compression
      sends them, error feedback keeps its memory elsewhere); its state (the adaptive clip
      norm, the error-feedback memory) is `HeteroState.aggregator`, checkpointed with the
      server state.
    level_clients: None, or the number of clients at each capacity level (public: the
      server assigns capacities; `_hetero.level_counts`), with a fixed-denominator DP
      `aggregator` (`federated.dp_mean`): each coordinate's denominator becomes its
      expected holder count m x (share of the clients whose level holds it)
      (`_hetero.holder_share`; FedRolex: this round's windows) instead of m.

  Returns:
    HeteroMethod with HeteroState.

  References:
    Diao, Ding, Tarokh, HeteroFL: Computation and Communication Efficient
    Federated Learning for Heterogeneous Clients, ICLR 2021.
  """
  return width_method(apply_fn, client_optimizer, schedule, capacities=capacities, widths=widths,
                      rolling=False, scaler=scaler, server_learning_rate=server_learning_rate,
                      loss_fn=loss_fn, train_transform=train_transform, input_keys=input_keys,
                      output_keys=output_keys, flatten_keys=flatten_keys, spec=spec,
                      grouped=grouped, aggregator=aggregator, level_clients=level_clients)


def heterofl_method(hetero: HeteroMethod, **kwargs) -> federated.Method:
  """HeteroFL end to end: `heterofl(...)`'s algorithm, evaluated per capacity level. Nothing runs
  between rounds (every client's submodel is derived inside the compiled round).

  Args:
    hetero: `heterofl(...)`.
    **kwargs: `_hetero.submodel_method`'s keyword arguments (spec, params, batch_stats,
      key, eval_apply, test, client_caps, capacities, sweep, sweep_every, num_rounds).
  """
  return _hetero.submodel_method(hetero, **kwargs)
