"""experiments.curves: the convergence tail and the plateau round (hand-made curves)."""
import json

import pytest

from experiments import curves

EVERY = 20


def _curve(fn, rounds=1000):
  return {r: fn(r) for r in range(EVERY, rounds + 1, EVERY)}


def test_plateau_round_of_a_step_is_where_both_ends_of_the_tail_are_on_it():
  """0.2 before round 400, 0.5 from it: the last 3 evaluations are all on the plateau from
  round 440, but the tail's start (3 evaluations at or before 0.8 r) only from 0.8 r >= 440,
  i.e. the first evaluated round 560. A rule without the tail test would say 440."""
  curve = _curve(lambda r: 0.5 if r >= 400 else 0.2)
  assert curves.plateau_round(curve, 1000) == 560


def test_plateau_round_skips_an_early_false_plateau():
  """A flat stretch at 0.3 (converged by the tail test alone from ~round 300) is 20 points
  below the final plateau: the level test carries R on to where 0.5 is reached and settled
  (0.8 r >= 640: round 800)."""
  curve = _curve(lambda r: 0.2 if r < 200 else (0.3 if r < 600 else 0.5))
  assert curves.plateau_round(curve, 1000) == 800
  # 'within' is the tolerance: a curve 0.5 point under its plateau at round 600 is on it
  near = _curve(lambda r: 0.2 if r < 400 else (0.495 if r < 600 else 0.5))
  assert curves.plateau_round(near, 1000) == 560


def test_plateau_round_refuses_a_curve_that_has_not_converged():
  climbing = _curve(lambda r: r / 2000)  # +10 points over the last 20 %
  with pytest.raises(ValueError, match=r"not converged at round 1000: .* gained 10\.0 points"):
    curves.plateau_round(climbing, 1000)
  with pytest.raises(ValueError, match="cannot be judged converged at round 1000"):
    curves.plateau_round(_curve(lambda r: 0.5, rounds=800), 1000)  # stopped at 800


def test_read_curve_keeps_evaluated_rounds_and_stops_at_a_cut_line(tmp_path):
  lines = [json.dumps({"round": 1, "train_loss": 2.0}),
           json.dumps({"round": 2, "test_accuracy": 0.25}),
           json.dumps({"round": 3, "test_accuracy": None}),
           json.dumps({"round": 4, "test_accuracy": 0.5})]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 5, "test_acc')
  assert curves.read_curve(str(tmp_path)) == {2: 0.25, 4: 0.5}
