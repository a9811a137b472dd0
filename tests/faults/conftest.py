"""Fault-injection suite: one file per seam. Each test's docstring is one row of docs/reliability.md
(`python tests/faults/table.py > docs/reliability.md`): `fault or input -> what the program does`."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the shared tiny-checkpoint helpers
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: train.py

from test_train import world  # noqa: E402,F401  (module fixture: tiny checkpoint, images, pairs)


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.slow tests run only when asked for (`-m slow`)."""
    import pytest
    if "slow" in (config.getoption("markexpr") or ""):
        return
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.skip(reason="slow soak variant: run with -m slow"))
