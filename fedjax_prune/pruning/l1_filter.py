"""Fixed-ratio L1-norm filter pruning (Li et al. 2017) through the structured surgery.

Every prunable conv group (the same groups as ASP, `auto_structured.prunable_groups`)
keeps its `round((1 - ratio) * width)` filters of largest L1 norm (at least
one); the surviving weights are kept (`structured.shrink`) and the smaller
model is fine-tuned, in FL with FedAvg. The fixed-ratio counterpart of ASP's
adaptive mean +- k std boundary.

References:
  Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient
  ConvNets", ICLR 2017.
"""
from __future__ import annotations

from typing import Optional


from fedjax_prune import federated, structured
from fedjax_prune.pruning import auto_structured
from fedjax_prune.types import BatchStats, Params


def l1_filter_keep(spec, params: Params, ratio: float) -> dict:
  """Kept filters per group: the top `round((1 - ratio) * width)` by L1 norm (>= 1).

  ResNet stream groups as wide as the stem keep the stem's count (as in ASP).

  Args:
    spec: model spec.
    params: its params (concrete).
    ratio: fraction of filters removed per layer, in [0, 1).

  Returns:
    {group name: bool [width]}.
  """
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
    raise ValueError(f'ratio must be a number in [0, 1), got {ratio!r}')
  scored, follows = auto_structured.prunable_groups(spec)
  scores = structured.group_l1(spec, params)
  keep = {}
  for name in scored + list(follows):
    width = scores[name].shape[0]
    n = max(1, int(round((1 - ratio) * width)))
    keep[name] = auto_structured.top_keep(scores[name], n)
  return keep


def l1_filter_prune(spec, params: Params, ratio: float, *,
                    batch_stats: Optional[BatchStats] = None) -> structured.Shrunk:
  """Prunes `ratio` of the filters of every prunable conv by L1 norm; keeps surviving weights.

  Example:
    >>> import jax
    >>> from fedjax_prune import models
    >>> from fedjax_prune.pruning import l1_filter
    >>> spec = models.asp_femnist_cnn(widths=(8, 16))
    >>> params, _ = models.init_params(spec, jax.random.key(0))
    >>> l1_filter.l1_filter_prune(spec, params, 0.5).spec.convs[1].features
    8
  """
  return structured.shrink(spec, params, l1_filter_keep(spec, params, ratio),
                           batch_stats=batch_stats)


def l1_filter(ratio: float, prune_round: int, **kwargs) -> federated.Method:
  """L1 filter pruning end to end: dense FedAvg for `prune_round` rounds ('dense'), then
  every prunable conv loses `ratio` of its filters (smallest L1, surviving weights kept)
  and FedAvg fine-tunes the smaller model ('train').

  Args:
    ratio: fraction of filters removed per prunable conv, in [0, 1).
    prune_round: rounds of dense training before the prune.
    **kwargs: `auto_structured.rebuilding_fedavg`'s keyword arguments.
  """
  if isinstance(prune_round, bool) or not isinstance(prune_round, int) or prune_round < 0:
    raise ValueError(f"prune_round must be an int >= 0, got {prune_round!r}")

  def decide(search, spec, params, batch_stats, round_idx, key):
    del key
    unchanged = auto_structured.Decision(False, spec, params, batch_stats, None, None)
    if not search.still_prune:
      return search, "train", unchanged
    if round_idx < prune_round:
      return search, "dense", unchanged
    keep = l1_filter_keep(spec, params, ratio)
    out = structured.shrink(spec, params, keep, batch_stats=batch_stats)
    search = search._replace(still_prune=False, num_accepted=1, last_decision_round=round_idx)
    return search, "dense", auto_structured.Decision(True, out.spec, out.params, out.batch_stats,
                                                     keep, None)

  # still_prune = not yet pruned
  return auto_structured.rebuilding_fedavg(decide, auto_structured.AutoStructuredState(True, 0, 0, 0),
                                           **kwargs)
