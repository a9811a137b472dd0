"""docs/reliability.md is generated from the fault suite's docstrings (tests/faults/table.py): it must be what the
generator prints now, so a fault test added or changed without regenerating the table fails here."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reliability_table_is_current():
    r = subprocess.run([sys.executable, str(REPO / "tests" / "faults" / "table.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # every fault test's docstring reads `fault -> behaviour`
    assert (REPO / "docs" / "reliability.md").read_text().strip() == r.stdout.strip(), \
        "docs/reliability.md is stale: python tests/faults/table.py > docs/reliability.md"
