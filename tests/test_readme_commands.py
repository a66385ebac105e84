"""Every ``msif ...`` line of the README runs as written after the demo, in a fresh process.

The snapshot comes from ``examples/digits/run.py`` itself (what ``make demo`` runs), started in a temporary
folder so that its default ``snapshot_dir`` (``runs/msif``) is the folder the README's commands name; only its
size is cut (fewer examples and epochs, no logger). The README's lines are then run unchanged, with W&B offline
and every W&B folder inside the test's tmp dir. Two chains run side by side: the demo and the commands that read
its snapshot, and the ``evaluate`` lines (they share a retraining cache, so they keep their order).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest

pytest.importorskip("sklearn")

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "examples" / "digits" / "run.py"
SMALL_DEMO = ["logger=none", "data.limit=300", "pretrain.max_epochs=40", "finetune.max_epochs=20", "model.hidden=8",
              "solver=exact"]  # a tiny, briefly trained model: the exact solve takes any curvature


def readme_commands() -> List[List[str]]:
    """The ``msif`` command lines of the README's bash blocks, split as a shell would (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()
            if line.startswith("msif ")]


def _env(tmp: Path) -> Dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (tmp / var.lower()).mkdir(exist_ok=True)
        env[var] = str(tmp / var.lower())
    return env


def _run_all(commands: List[List[str]], cwd: Path, env: Dict[str, str]) -> List[str]:
    """Run the commands in order (``msif`` as ``python -m lightning_msif``); stop at the first failure."""
    done = []
    for argv in commands:
        argv = [sys.executable, "-m", "lightning_msif", *argv[1:]] if argv[0] == "msif" else argv
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        done.append(proc.stdout)
    return done


def test_the_readme_lists_the_commands_this_test_runs() -> None:
    commands = readme_commands()
    assert {c[1] for c in commands} >= {"score", "report", "evaluate", "--help"}
    assert all("runs/msif" in " ".join(c) for c in commands if c[1] in ("score", "report"))


def test_readme_commands_run_after_the_demo(tmp_path: Path) -> None:
    commands, env = readme_commands(), _env(tmp_path)
    evaluate = [c for c in commands if c[1] == "evaluate"]
    after_demo = [[sys.executable, str(DEMO), *SMALL_DEMO], *(c for c in commands if c[1] != "evaluate")]
    with ThreadPoolExecutor(2) as pool:
        chains = [pool.submit(_run_all, chain, tmp_path, env) for chain in (after_demo, evaluate)]
        outputs = [chain.result() for chain in chains]
    assert (tmp_path / "runs" / "msif" / "scores.safetensors").exists()
    assert (tmp_path / "runs" / "msif" / "report" / "report.html").exists()
    assert "retraining runs: 0 trained" in outputs[1][-1]  # the second evaluate line reuses the first's retrains
    assert not any((tmp_path / "wandb_data_dir").rglob("*.png")), "report images left in W&B's staging folder"
