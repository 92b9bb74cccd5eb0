"""Checks shared by the driver tests."""
from experiments import build


def assert_counted_accuracy(accuracy: float, config) -> None:
  """`accuracy` is a count of correct predictions over the config's pooled test set: an exact
  multiple of 1 / N (a mean of padded per-batch means, a NaN or a made-up value is not)."""
  num_test = len(build.build_data(config).test_y)
  correct = accuracy * num_test
  assert num_test > 0 and abs(correct - round(correct)) < 1e-4, (accuracy, num_test)
