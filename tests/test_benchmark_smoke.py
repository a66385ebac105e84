"""Smoke test of ``benchmarks/scoring_pass.py``: ``--quick`` runs, and every scoring method's scores
equal the naive per-example ``torch.autograd.grad`` loop's."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scoring_pass.py"


def test_scoring_pass_benchmark_quick() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for method in ("grad", "jvp", "auto→"):
        assert re.search(rf"^\s*\d+\s+{method}", out.stdout, re.MULTILINE), f"no {method} row:\n{out.stdout}"
    match = re.search(r"max relative error vs naive = ([0-9.eE+-]+)", out.stdout)
    assert match, out.stdout
    assert float(match.group(1)) < 1e-4
    assert "peak memory added by the scoring pass" in out.stdout
