"""The one timing rule of the benchmarks: median wall seconds over repeated calls."""

import statistics
import time


def median_seconds(fn, repeats: int):
  """(median seconds per call of `fn()` over `repeats` calls, the last call's result)."""
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), out
