"""The application experiments (examples/applications) run end to end in their ``--quick`` mode.

Only the shape of what they produce is checked — markdown tables on stdout, PNG plots in ``--out`` — not
the numbers, which docs/results.md reports from full runs.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "applications"

CASES = {
    "harmful_data": (("Finding the corrupted", "Where the corrupted", "Solvers"), ("harmful_data_digits.png",)),
    "data_removal": (("Removing pretraining examples, fixed", "Removing pretraining examples, updated"),
                     ("data_removal_digits.png",)),
    "class_influence": (("Visual similarity (centred)", "Mean influence M", "Does helpfulness follow"),
                        ("class_influence.png",)),
    "second_pair": (("Is it a transfer?", "Finding the flipped", "Removing pretraining examples", "Class to class"),
                    ("second_pair_detection.png", "second_pair_removal.png")),
}


def tables(stdout: str) -> int:
    """Markdown tables printed: header separator lines."""
    return sum(line.startswith("|---|") for line in stdout.splitlines())


@pytest.mark.parametrize("script", sorted(CASES))
def test_quick_run_prints_tables_and_writes_plots(script: str, tmp_path: Path) -> None:
    titles, images = CASES[script]
    run = subprocess.run([sys.executable, str(SCRIPTS / f"{script}.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert out.startswith("hardware: ") and "wall time: " in out
    for title in titles:
        assert f"### {title}" in out, title
    assert tables(out) >= len(titles)
    for name in images:
        png = tmp_path / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(images)


def test_help_lists_the_shared_options() -> None:
    run = subprocess.run([sys.executable, str(SCRIPTS / "harmful_data.py"), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0
    for option in ("--seeds", "--quick", "--out", "--alphas", "--problem"):
        assert option in run.stdout
