"""Fault-injection suite: one file per seam. Each test's docstring is one row of docs/reliability.md
(`python tests/faults/table.py > docs/reliability.md`): `fault or input -> what the program does`."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the shared tiny-checkpoint helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: train.py

from test_train import world  # noqa: E402,F401  (module fixture: tiny checkpoint, images, pairs)
