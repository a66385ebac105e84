"""Standalone DDP job (2 CPU processes, gloo) whose rank 1 is killed (SIGKILL) in the middle of the finetune stage's
scoring pass; run by tests/test_ddp.py, which expects the whole job to stop with an error soon after, not hang.

Usage: python tests/ddp_rank_dies_job.py OUT_DIR
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch.distributed as dist  # noqa: E402
from lightning_fixtures import TinyDataModule, TinyModule, trainer  # noqa: E402

import lightning_msif.core.influence as influence  # noqa: E402
from lightning_msif import MultiStageInfluence, PretrainingSnapshot, load_pretrained  # noqa: E402

real = influence.score_pass


def score_pass(*args, **kwargs):
    if dist.is_initialized() and dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no message: as a crashed node or an OOM kill
    return real(*args, **kwargs)


def main(out: Path) -> None:
    run = dict(strategy="ddp", devices=2, max_epochs=3)
    trainer(callbacks=[PretrainingSnapshot(out, progress=False)], **run).fit(TinyModule(), datamodule=TinyDataModule())
    influence.score_pass = score_pass
    fine = load_pretrained(TinyModule(classes=2, freeze_backbone=True, init_seed=1), out)
    cb = MultiStageInfluence(out, mode="fixed", damping=0.01, solver="exact", progress=False, report=False)
    trainer(callbacks=[cb], **run).fit(fine, datamodule=TinyDataModule(n=11, classes=2, seed=5))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
