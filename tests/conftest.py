"""Shared fixtures of the math-core tests (the reference itself lives in ``reference.py``)."""
from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch
from wandb_offline import wandb_env  # noqa: F401  (fixture: W&B offline in the test's tmp dir)


class DictStore:
    """A ``ScoreStore``: a dict with get/put, recording every key asked for and written."""

    def __init__(self, data: Optional[Dict[str, torch.Tensor]] = None):
        self.data: Dict[str, torch.Tensor] = dict(data or {})
        self.gets: List[str] = []
        self.hits: List[str] = []
        self.puts: List[str] = []

    def get(self, key: str) -> Optional[torch.Tensor]:
        self.gets.append(key)
        t = self.data.get(key)
        if t is None:
            return None
        self.hits.append(key)
        return t.clone()

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self.puts.append(key)
        self.data[key] = tensor.detach().clone()

    def without(self, *keys: str) -> "DictStore":
        """A fresh store holding everything but ``keys`` (no recorded history)."""
        return DictStore({k: v for k, v in self.data.items() if k not in keys})


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: these tensors are tiny, and on a busy 2-core machine extra threads only
    contend (LiSSA's thousands of small Hessian-vector products ran ~5× slower with 2). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_store():
    return DictStore


@pytest.fixture
def solve_calls(monkeypatch):
    """Every linear solve the public API runs, as a list of (solver name, number of right-hand sides)."""
    import lightning_msif.core.influence as influence

    calls = []
    real = influence.solve

    def counting(op, rhs, solver, opts, progress=None):
        calls.append((solver, rhs.shape[0]))
        return real(op, rhs, solver, opts, progress)

    monkeypatch.setattr(influence, "solve", counting)
    return calls


@pytest.fixture(scope="session", autouse=True)
def snapshot_key(tmp_path_factory):
    """The per-user key that signs snapshot records, in a temporary folder (inherited by subprocesses), so the
    tests neither read nor create one in the home folder."""
    import os

    from lightning_msif.trust import KEY_ENV

    before = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = str(tmp_path_factory.mktemp("key") / "snapshot.key")
    yield os.environ[KEY_ENV]
    if before is None:
        del os.environ[KEY_ENV]
    else:
        os.environ[KEY_ENV] = before
