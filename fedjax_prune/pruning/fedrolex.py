"""FedRolex: rolling width submodels (Alam et al., NeurIPS 2022).

In round t a width-r client keeps channels {(t + j) mod C : j < ceil(r C)} of
every hidden layer (`channel_keep(C, r, offset=t)`); otherwise as HeteroFL
(partial averaging, static BN, scaler). Shared machinery in
`_width_submodels.width_method`.

Evaluation protocol, from the official code (github.com/AIoT-MLSys-Lab/FedRolex @ 8135109):
  * `main_resnet.py` L150-157: after `server.step(...)` the test model is the server's
    `global_model`, built at L103 with `model_rate=cfg["global_model_rate"]` (the largest
    level, `utils.py` L132; 'a' = 1 in every published command), and `test()` (L184-220)
    evaluates that one full-size model on every client's local test split ("Local", via
    `resnet_client.py` `test_model_for_user`, L98-) and on the whole test set ("Global").
    No width-r submodel is ever evaluated: the capacity-1 level is the only model FedRolex
    itself reports, and it is the same whichever window is chosen below.
  * The only way the code extracts a width-r model is `resnet_server.py` `split_model`
    (L82-110): `roll = self.rounds % C`, `torch.roll(arange(C), roll)[:ceil(r C)]`, with
    `self.rounds` incremented by `step` (L45-47) before `test()` runs. A level-r model
    "as the code does it" is therefore the window the server would extract at evaluation
    time, the one the next round hands out: offset = completed rounds (`eval_window=
    'extraction'`, the default). `'last_round'` evaluates the window the last round trained
    (offset - 1; the protocol used before issue 24), `'prefix'` HeteroFL's first ceil(r C)
    channels. FIARSE's table reports FedRolex per level from the FIARSE authors' own,
    unreleased baseline code, so none of the three is known to be theirs.
  * Two documented differences: `torch.roll(arange(C), t)[:k]` is {(j - t) mod C}, a window
    sliding the other way from ours ({(t + j) mod C}; both are contiguous, nested across
    levels and cover every channel equally, so only the channel labels differ at a random
    init); and the official local test masks the logits of classes absent from the client's
    training labels (`models/resnet.py` L155-158, `cfg['mask']`), which FIARSE's Local
    metric does not.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import optax

from fedjax_prune import federated
from fedjax_prune.federated import LocalSchedule, softmax_cross_entropy
from fedjax_prune.pruning import _hetero
from fedjax_prune.pruning._hetero import HeteroMethod
from fedjax_prune.pruning._width_submodels import (EVAL_WINDOWS, INPUT_KEYS, NO_KEYS, OUTPUT_KEYS,
                                                   GroupedExecution, channel_keep, text_width_masks,
                                                   width_masks, width_method)

__all__ = ["EVAL_WINDOWS", "GroupedExecution", "fedrolex_method", "channel_keep", "fedrolex",
           "text_width_masks", "width_masks"]


def fedrolex(apply_fn: Callable, client_optimizer: optax.GradientTransformation,
             schedule: LocalSchedule, *, capacities: Sequence[float],
             widths: Sequence[float] | None = None, scaler: bool = True,
             eval_window: str = "extraction", server_learning_rate: float = 1.0,
             loss_fn: Callable = softmax_cross_entropy, train_transform: Callable | None = None,
             input_keys: str = INPUT_KEYS, output_keys: str = OUTPUT_KEYS,
             flatten_keys: str = NO_KEYS, spec=None,
             grouped: GroupedExecution | None = None,
             aggregator: federated.Aggregator | None = None,
             level_clients: Sequence[int] | None = None) -> HeteroMethod:
  """FedRolex: HeteroFL with a rolling channel window (offset = round index mod C).

  Arguments as `heterofl` (`flatten_keys`, `spec`, `grouped`, `aggregator` and
  `level_clients` included; the expected-count denominator follows this round's windows;
  on a text model the
  window rolls over each block's heads and FFN units, or each LSTM layer's units; with
  `grouped` each level gathers its window's channels, in window order, into its sliced
  model, so a level's program does not depend on the round), plus:
    eval_window: which channel window a width-r level is evaluated on (module docstring):
      'extraction' (default) the window the official server's `split_model` extracts at
      evaluation time, offset = completed rounds; 'last_round' the window the last round
      trained (offset = completed rounds - 1); 'prefix' the first ceil(r C) channels.
      Width-1 levels keep every channel under all three.

  References:
    Alam, Liu, Yan, Zhang, FedRolex: Model-Heterogeneous Federated Learning
    with Rolling Sub-Model Extraction, NeurIPS 2022.
  """
  return width_method(apply_fn, client_optimizer, schedule, capacities=capacities, widths=widths,
                      rolling=True, eval_window=eval_window, scaler=scaler,
                      server_learning_rate=server_learning_rate, loss_fn=loss_fn,
                      train_transform=train_transform, input_keys=input_keys,
                      output_keys=output_keys, flatten_keys=flatten_keys, spec=spec,
                      grouped=grouped, aggregator=aggregator, level_clients=level_clients)


def fedrolex_method(hetero: HeteroMethod, *, alternatives: Mapping[str, HeteroMethod] | None = None,
                    **kwargs) -> federated.Method:
  """FedRolex end to end: `fedrolex(...)`'s algorithm, evaluated per capacity level. Nothing runs
  between rounds (every client's submodel is derived inside the compiled round).

  Args:
    hetero: `fedrolex(...)` (its `eval_window` picks the evaluated windows).
    alternatives: name -> another `fedrolex(...)` of the same run (e.g. another
      `eval_window`) whose submodels are evaluated on the same trained state too; their
      metrics are recorded as `<name>_<metric>` (e.g. `last_round_global_1/4`). Only
      their `submodel` is used: training is `hetero`'s.
    **kwargs: `_hetero.submodel_method`'s keyword arguments (spec, params, batch_stats,
      key, eval_apply, test, client_caps, capacities, sweep, sweep_every, num_rounds).
  """
  method = _hetero.submodel_method(hetero, **kwargs)
  if not alternatives:
    return method
  others = {name: _hetero.submodel_method(alt, **kwargs) for name, alt in alternatives.items()}

  def evaluator(spec):
    main = method.evaluator(spec)
    extra = {name: other.evaluator(spec) for name, other in others.items()}

    def evaluate(state, round_idx):
      out = main(state, round_idx)
      for name, fn in extra.items():
        out.update({f"{name}_{k}": v for k, v in fn(state, round_idx).items()
                    if k not in ("test_accuracy", "local_accuracy_mean")})
      return out

    return evaluate

  return method._replace(evaluator=evaluator)
