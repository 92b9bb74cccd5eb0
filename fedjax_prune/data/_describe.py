"""Summary statistics and a label-distribution plot of a federated dataset."""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from fedjax_prune.data._client_data import ClientData
from fedjax_prune.data._federated import FederatedDataset

_STACKED_BAR_MAX_CLASSES = 20
_STACKED_BAR_MAX_CLIENTS = 100


class ClientStats(NamedTuple):
  """Per-client statistics of one split (medians are floats: np.median)."""
  num_clients: int
  num_examples: int
  examples_min: int
  examples_median: float
  examples_max: int
  classes_min: int
  classes_median: float
  classes_max: int
  classes_present: int
  num_empty_clients: int


def label_counts(data: ClientData, num_classes: int) -> np.ndarray:
  """Counts each label among every client's real examples.

  Args:
    data: ClientData with integer y [N, E] (or [N, E, T]: every position counts).
    num_classes: labels lie in [0, num_classes).

  Returns:
    [N, num_classes] int64 counts.
  """
  y, n = np.asarray(data.y), np.asarray(data.num_examples)
  num_clients = y.shape[0]
  mask = np.arange(y.shape[1])[None, :] < n[:, None]
  mask = np.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - 2)), y.shape)
  labels = y[mask].astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"label {labels.min() if labels.min() < 0 else labels.max()} outside [0, {num_classes})")
  rows = np.broadcast_to(np.arange(num_clients).reshape((-1,) + (1,) * (y.ndim - 1)), y.shape)[mask]
  return np.bincount(rows * num_classes + labels, minlength=num_clients * num_classes).reshape(
      num_clients, num_classes)


def client_stats(data: ClientData, num_classes: int) -> ClientStats:
  """Examples and classes per client (min / median / max) of one split.

  Args:
    data: ClientData of the split.
    num_classes: labels lie in [0, num_classes).

  Returns:
    ClientStats.
  """
  counts = label_counts(data, num_classes)
  n = np.asarray(data.num_examples).astype(np.int64)
  k = (counts > 0).sum(axis=1)
  return ClientStats(
      num_clients=int(len(n)), num_examples=int(n.sum()),
      examples_min=int(n.min()), examples_median=float(np.median(n)), examples_max=int(n.max()),
      classes_min=int(k.min()), classes_median=float(np.median(k)), classes_max=int(k.max()),
      classes_present=int((counts.sum(axis=0) > 0).sum()), num_empty_clients=int((n == 0).sum()))


def _fmt(x: float) -> str:
  return f"{int(x):,}" if float(x).is_integer() else f"{x:,.1f}"


def _split_text(name: str, stats: ClientStats, num_classes: int, extra: str = "") -> str:
  lines = [f"{name}: {stats.num_clients:,} clients{extra}, {stats.num_examples:,} examples"
           + (f", {stats.num_empty_clients} clients without examples" if stats.num_empty_clients else ""),
           f"  examples per client: min {_fmt(stats.examples_min)} / median {_fmt(stats.examples_median)}"
           f" / max {_fmt(stats.examples_max)}",
           f"  classes per client:  min {stats.classes_min} / median {_fmt(stats.classes_median)}"
           f" / max {stats.classes_max}; classes present {stats.classes_present}/{num_classes}"]
  return "\n".join(lines)


def describe(dataset: FederatedDataset | ClientData, plot_path: str | os.PathLike | None = None, *,
             num_classes: int | None = None) -> str:
  """A text summary of a federated dataset, and optionally a label-distribution PNG.

  Args:
    dataset: a FederatedDataset, or a bare ClientData (then pass num_classes).
    plot_path: where to write a PNG of per-client label counts of the train
      split (stacked bars for <= 20 classes and <= 100 clients, else a heatmap
      of each client's label fractions), with examples per client below.
    num_classes: required for a bare ClientData (default: max label + 1).

  Returns:
    The summary (clients, examples per client min/median/max, classes per
    client min/median/max, totals) as a multi-line string.
  """
  if isinstance(dataset, FederatedDataset):
    num_classes = dataset.num_classes
    train, test = dataset.train, dataset.test
    header = [dataset.description,
              f"num_classes {num_classes}, input_shape {tuple(dataset.input_shape)}, "
              f"x dtype {np.asarray(train.x).dtype}"]
  elif isinstance(dataset, ClientData):
    train, test = dataset, None
    if num_classes is None:
      num_classes = 1 + int(np.asarray(dataset.y).max())
    header = [f"ClientData x {tuple(np.shape(dataset.x))} {np.asarray(dataset.x).dtype}, "
              f"num_classes {num_classes}"]
  else:
    raise TypeError(f"dataset must be a FederatedDataset or ClientData, got {type(dataset).__name__}")
  train_stats = client_stats(train, num_classes)
  parts = header + [_split_text("train", train_stats, num_classes)]
  if test is not None:
    extra = ""
    if isinstance(dataset, FederatedDataset) and test.num_clients > train.num_clients:
      extra = f" ({test.num_clients - train.num_clients:,} test-only)"
    parts.append(_split_text("test", client_stats(test, num_classes), num_classes, extra))
  if plot_path is not None:
    _plot(label_counts(train, num_classes), os.fspath(plot_path))
  return "\n".join(parts)


def _plot(counts: np.ndarray, path: str) -> None:
  """Writes the label-distribution figure (Agg canvas, no pyplot global state)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  num_clients, num_classes = counts.shape
  fig = Figure(figsize=(max(6.0, min(24.0, 0.08 * num_clients + 4)), 6.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax, ax_n = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
  xs = np.arange(num_clients)
  if num_classes <= _STACKED_BAR_MAX_CLASSES and num_clients <= _STACKED_BAR_MAX_CLIENTS:
    cmap = matplotlib.colormaps["tab20"]
    bottom = np.zeros(num_clients)
    for c in range(num_classes):
      ax.bar(xs, counts[:, c], bottom=bottom, width=0.9, label=str(c), color=cmap(c % 20))
      bottom += counts[:, c]
    ax.set_ylabel("examples")
    ax.legend(title="label", fontsize="small", ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("label counts per client (train)")
  else:
    frac = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    vmax = max(float(np.quantile(frac, 0.99)), 1e-6)  # a few single-class clients would wash out the rest
    im = ax.imshow(frac.T, aspect="auto", interpolation="nearest", origin="lower", cmap="viridis",
                   vmin=0.0, vmax=vmax, extent=(-0.5, num_clients - 0.5, -0.5, num_classes - 0.5))
    fig.colorbar(im, ax=ax, label="fraction of client's examples (clipped at 99th pct)")
    ax.set_ylabel("label")
    ax.set_title("label distribution per client (train)")
  ax_n.bar(xs, counts.sum(axis=1), width=0.9, color="0.4")
  ax_n.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax_n.set_xlabel("client")
  ax_n.set_ylabel("examples")
  fig.savefig(path, dpi=100)
