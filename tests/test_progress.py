"""Progress bars of the long phases: an iterative solve's bar follows its residual (not its iteration cap); curvature
fitting and exact solves show their passes over the data. Read from what tqdm really writes to a terminal."""
from __future__ import annotations

import io
import re

import pytest
from reference import loader, problem

from lightning_msif import multistage_influence
from lightning_msif.core.progress import ResidualProgress
from lightning_msif.core.solvers import SOLVERS

pytestmark = pytest.mark.usefixtures("single_thread")


class Terminal(io.StringIO):
    """What tqdm writes to stderr when stderr is a terminal (it shows nothing otherwise)."""

    def isatty(self) -> bool:
        return True


def terminal(monkeypatch) -> Terminal:
    """stderr as a terminal, set in the test itself (pytest sets its own stderr after the fixtures)."""
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    return screen


def _scores(**settings) -> None:
    pre, fine, pt, ft, q = problem()
    multistage_influence(pre, fine, loader(pt), loader(ft), loader(q), shared="backbone", damping=0.5, progress=True,
                         **settings)


def test_an_iterative_solve_measures_digits_of_residual_towards_tol(monkeypatch) -> None:
    screen = terminal(monkeypatch)
    cg = SOLVERS.get("cg")
    options = cg.Options(tol=1e-6, max_iter=500)
    assert cg.target(options) == 1e-6 and not cg.steps(options)  # the cap is no longer the bar's length
    bar = ResidualProgress("solve", tol=1e-6)
    for it, residual in enumerate((0.5, 1e-3, 2e-3), start=1):  # CG's residual may rise again: the bar holds
        bar.residual(residual, it)
    assert (bar.bar.total, bar.bar.n) == (6.0, 3.0)  # half the digits: half the work, whatever max_iter is
    bar.residual(1e-9, 4)
    assert bar.bar.n == 6.0
    bar.close()
    assert "residual=1.00e-09" in screen.getvalue()


@pytest.mark.parametrize("settings, bars", [
    (dict(solver="cg", curvature="ggn", tol=1e-10), [r"pretrain solve \(cg\):.*digit.*it=\d+, residual="]),
    (dict(solver="exact", curvature="hessian"), [r"pretrain solve \(exact\), pass 1:.*/13 "]),
    (dict(solver="direct", curvature="ekfac"),
     [r"pretrain curvature \(ekfac\), pass 1:.*/13 ", r"pretrain curvature \(ekfac\), pass 2"]),
])
def test_every_long_phase_shows_a_bar(monkeypatch, settings, bars) -> None:
    screen = terminal(monkeypatch)
    _scores(**settings)
    for bar in bars:
        assert re.search(bar, screen.getvalue()), screen.getvalue()[-2000:]


def test_a_report_read_block_by_block_shows_its_passes(monkeypatch) -> None:
    """The report's passes over the scores (a streamed matrix may be far larger than memory) show their rows."""
    import torch

    from lightning_msif.reports.attribution import Attribution
    from lightning_msif.core.scoring import DenseScores

    screen = terminal(monkeypatch)
    att = Attribution(DenseScores(torch.randn(9000, 3, generator=torch.Generator().manual_seed(0))), progress=True)
    att.top_k(2)
    att.histogram()
    shown = screen.getvalue()
    for what in ("top lists and sums", "histogram"):  # a bar over the matrix's rows per pass (cleared when done)
        assert re.search(rf"report: {what}: .*/9000 \[.*rows/s\]", shown), shown
    quiet = terminal(monkeypatch)
    Attribution(torch.randn(9000, 3)).top_k(2)
    assert quiet.getvalue() == ""
