"""The peer to beat on CPU: a PyTorch FedAvg round as the papers' own code runs it.

Prints a table and writes JSON. Needs PyTorch, which is not a dependency of this
project (CPU wheel: `pip install torch --index-url https://download.pytorch.org/whl/cpu`).

  python benchmarks/torch_peer.py                      # LEAF FEMNIST CNN, cohorts 8,32
  python benchmarks/torch_peer.py --cohorts 8,32,128 --steps 4 --batch 32

Workload: the same as `benchmarks/engine.py` (FedAvg, plain SGD lr 0.01, batch B,
S local steps per client on random data, one round = every cohort client plus
the average). The round is what FIARSE/FedTiny/PruneFL's official code does:
for each client, load the global state dict, train S steps with
`torch.optim.SGD`, add the client's state dict to a running sum; then divide.
Batches are made before timing (the loop pays no data loading). PyTorch uses all
cores of the machine for each op (its default), as JAX does.

Compare its client-steps/s with engine.py's rows from the same machine, run one
after the other (docs/results/engine.md); GFLOP/s use the same FLOP count
(3 x forward, accounting.training_flops).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# No JAX import here: the script runs in any environment that has PyTorch.
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Training FLOPs (3 x forward) of one LEAF FEMNIST CNN example, accounting.training_flops / batch;
# checked against the accounting module in tests/test_benchmarks.py.
LEAF_CNN_TRAIN_FLOPS_PER_EXAMPLE = 103_271_424


def _import_torch():
  try:
    import torch
  except ImportError:
    raise SystemExit("benchmarks/torch_peer.py needs PyTorch, which this project does not depend on: "
                     "pip install torch --index-url https://download.pytorch.org/whl/cpu") from None
  return torch


def leaf_cnn(torch, num_classes: int = 62, widths=(32, 64), dense: int = 2048):
  """The LEAF FEMNIST CNN: conv5x5 same -> pool 2 -> conv5x5 same -> pool 2 -> dense -> dense."""
  nn, F = torch.nn, torch.nn.functional

  class LeafCNN(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, widths[0], 5, padding=2)
      self.conv2 = nn.Conv2d(widths[0], widths[1], 5, padding=2)
      self.dense1 = nn.Linear(7 * 7 * widths[1], dense)
      self.dense2 = nn.Linear(dense, num_classes)

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.conv1(x)), 2)
      x = F.max_pool2d(F.relu(self.conv2(x)), 2)
      return self.dense2(F.relu(self.dense1(x.flatten(1))))

  return LeafCNN()


def fedavg_round(torch, model, global_state, batches, lr: float):
  """One FedAvg round, one client after another; returns the new global state dict."""
  F = torch.nn.functional
  total = None
  for client_batches in batches:
    model.load_state_dict(global_state)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in client_batches:
      opt.zero_grad()
      F.cross_entropy(model(x), y).backward()
      opt.step()
    with torch.no_grad():
      state = model.state_dict()
      if total is None:
        total = {k: v.detach().clone() for k, v in state.items()}
      else:
        for k, v in state.items():
          total[k].add_(v)
  return {k: v / len(batches) for k, v in total.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cohorts", default="8,32")
  parser.add_argument("--steps", type=int, default=4, help="local steps per client")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes")
  parser.add_argument("--out", default="")
  parser.add_argument("--out-dir", default="")
  args = parser.parse_args(argv)
  torch = _import_torch()
  torch.manual_seed(0)
  cohorts = [int(c) for c in args.cohorts.split(",")]
  widths, dense = ((32, 64), 2048) if not args.smoke else ((4, 8), 32)
  if args.smoke:
    cohorts, args.steps, args.batch, args.repeats = [2], 2, 8, 1
  flops_per_example = LEAF_CNN_TRAIN_FLOPS_PER_EXAMPLE if not args.smoke else None
  model = leaf_cnn(torch, widths=widths, dense=dense)
  global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  print(f"torch {torch.__version__} threads={torch.get_num_threads()}")
  print(f"{'C':>5s} {'ms/round':>10s} {'cl-steps/s':>12s} {'ms/step':>8s} {'GFLOP/s':>9s}")
  rows = []
  for cohort in cohorts:
    batches = [[(torch.rand(args.batch, 1, 28, 28), torch.randint(0, 62, (args.batch,)))
                for _ in range(args.steps)] for _ in range(cohort)]
    state = fedavg_round(torch, model, global_state, batches, 0.01)  # warm-up
    times = []
    for _ in range(max(1, args.repeats)):
      start = time.perf_counter()
      state = fedavg_round(torch, model, state, batches, 0.01)
      times.append(time.perf_counter() - start)
    t = statistics.median(times)
    steps = cohort * args.steps
    gflops = (flops_per_example * args.batch * steps / t / 1e9) if flops_per_example else None
    rows.append(dict(model="leaf_femnist_cnn", cohort=cohort, strategy="torch_loop", round_s=t,
                     client_steps_per_s=steps / t, ms_per_step=1e3 * t / steps, gflops=gflops))
    print(f"{cohort:5d} {t * 1e3:10.1f} {steps / t:12.1f} {1e3 * t / steps:8.2f} "
          f"{gflops or float('nan'):9.1f}")
  out = args.out or os.path.join(args.out_dir or RESULTS_DIR,
                                 f"torch_peer_cpu{'_smoke' if args.smoke else ''}.json")
  result = dict(benchmark="torch_peer", torch=torch.__version__, threads=torch.get_num_threads(),
                num_cpus=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                steps=args.steps, batch=args.batch,
                command="python benchmarks/torch_peer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".tmp", "w") as f:  # atomic: a killed run leaves the previous file
    json.dump(result, f, indent=1)
  os.replace(out + ".tmp", out)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
