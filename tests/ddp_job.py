"""Standalone two-stage job under real DDP (2 CPU processes, gloo); run by tests/test_ddp.py.

Usage: python tests/ddp_job.py OUT_DIR [DEVICES]. Pretrains once with two pretrain callbacks (two
snapshot dirs), then finetunes in fixed mode (exact solver, scored from a gradient index captured by both ranks in
blocks of 4, the scores streamed: each rank writes its own blocks, none gathers them) into OUT_DIR/fixed and
in updated mode (CG, enforced proximal term, stored pretraining gradients)
into OUT_DIR/updated. n = 13 pretraining examples: not divisible by 2.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from lightning_fixtures import TinyDataModule, TinyModule, trainer  # noqa: E402

from lightning_msif import MultiStageInfluence, PretrainingSnapshot, load_pretrained  # noqa: E402

SETTINGS = {
    "fixed": dict(mode="fixed", damping=0.01, solver="exact", stream_scores=True),
    "updated": dict(mode="updated", alpha=0.5, damping=0.5, solver="cg", solver_options={"tol": 1e-12, "max_iter": 300}),
}

INDEX = dict(index_dim=2, index_block=4)


def main(out: Path, devices: int) -> None:
    run = dict(strategy="ddp" if devices > 1 else "auto", devices=devices, max_epochs=10)
    pre = TinyModule()
    # The updated-mode run also stores the pretraining gradients (gathered over ranks) and scores from them.
    callbacks = [PretrainingSnapshot(out / name, shared="backbone", store_gradients=name == "updated", progress=False,
                                     **(INDEX if name == "fixed" else {}))
                 for name in SETTINGS]
    trainer(callbacks=callbacks, **run).fit(pre, datamodule=TinyDataModule(n=13))
    for name, settings in SETTINGS.items():
        fine = load_pretrained(TinyModule(classes=2, freeze_backbone=name == "fixed", init_seed=1), out / name)
        cb = MultiStageInfluence(out / name, shared="backbone", progress=False,
                                 enforce_proximal=name == "updated", **settings)
        trainer(callbacks=[cb], **run).fit(fine, datamodule=TinyDataModule(n=11, n_val=7, classes=2, seed=5))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
