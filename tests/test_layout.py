"""The test tree has no __init__.py files (pytest's rootdir-relative "rootdir" import mode), so two test files
with the same basename in different folders collide at collection ("import file mismatch") — on whichever
xdist worker happens to collect both. Catch it here, on every worker, with the names."""

import collections
import os

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_test_file_basenames_are_unique():
  seen = collections.defaultdict(list)
  for root, _, files in os.walk(TESTS):
    for f in files:
      if f.startswith("test_") and f.endswith(".py"):
        seen[f].append(os.path.relpath(os.path.join(root, f), TESTS))
  dup = {k: v for k, v in seen.items() if len(v) > 1}
  assert not dup, f"test files share a basename (rename one): {dup}"
