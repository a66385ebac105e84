"""Standalone two-stage BERT job under real DDP (2 CPU processes, gloo), default influence settings (EK-FAC from
hooks, sampled-label Fisher); run by tests/test_ddp.py. Usage: python tests/ddp_real_job.py OUT_DIR [DEVICES]."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from lightning_fixtures import trainer  # noqa: E402
from real_models import HFClassifierModule, TokenDataModule  # noqa: E402

from lightning_msif import MultiStageInfluence, PretrainingSnapshot, load_pretrained  # noqa: E402


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    run = dict(strategy="ddp" if devices > 1 else "auto", devices=devices, max_epochs=2)
    trainer(callbacks=[PretrainingSnapshot(out, progress=False)], **run).fit(
        HFClassifierModule("bert", classes=4), datamodule=TokenDataModule(n=25, classes=4))
    fine = load_pretrained(HFClassifierModule("bert", classes=2, freeze_backbone=True, init_seed=1), out)
    cb = MultiStageInfluence(out, progress=False, report=False)
    trainer(callbacks=[cb], **run).fit(fine, datamodule=TokenDataModule(n=15, n_val=7, classes=2, seed=5))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
