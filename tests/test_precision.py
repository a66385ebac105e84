"""Every precision Lightning offers on CPU, both stages and both modes, scored against the functional API run on
float64 copies of the snapshots' weights (docs/architecture.md, "Precision")."""
import importlib.util

import pytest
import torch
from lightning_fixtures import TinyDataModule, TinyModule, trainer
from reference import rel_err
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from lightning_msif import (MSIFError, MultiStageInfluence, PretrainingSnapshot, SnapshotDir, load_pretrained,
                            multistage_influence, rescore)
from lightning_msif.core.influence import per_example_gradients

EPOCHS = 2
SETTINGS = {"fixed": dict(mode="fixed", damping=0.01), "updated": dict(mode="updated", alpha=0.5, damping=0.01)}
TE = "transformer-engine"  # fp8 through NVIDIA Transformer Engine: CUDA and its package only
TRAINED = {"64-true": torch.float64, "32-true": torch.float32, "bf16-true": torch.bfloat16,
           "16-true": torch.float16, "bf16-mixed": torch.float32, TE: torch.bfloat16}
NEEDS_TE = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                              reason="transformer-engine needs CUDA and the transformer_engine package (not on CPU)")
PRECISIONS = [pytest.param(p, marks=NEEDS_TE) if p == TE else p for p in TRAINED]
# "16-mixed" runs as "bf16-mixed" on CPU (test below)


class DefaultDtypeModule(TinyModule):
    """``TinyModule`` in the default dtype (float32; the trainer's under ``trainer.init_module()``), not float64."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.to(torch.get_default_dtype())


class Float32Blobs(TinyDataModule):
    """``TinyDataModule`` with float32 inputs, as real data comes."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.train_set, self.val_set = (TensorDataset(s.tensors[0].float(), s.tensors[1])
                                        for s in (self.train_set, self.val_set))


def _fit(precision: str, callback, dm, snapshot_dir=None, **module_kwargs):
    """A module created in the trainer's precision (loaded with the pretrained backbone when ``snapshot_dir``)."""
    t = trainer(precision=precision, callbacks=[callback], max_epochs=EPOCHS,
                accelerator="cuda" if precision == TE else "cpu")
    with t.init_module():
        module = DefaultDtypeModule(**module_kwargs)
    if snapshot_dir is not None:
        load_pretrained(module, snapshot_dir)
    t.fit(module, datamodule=dm)
    return module


@pytest.fixture(scope="module", params=PRECISIONS)
def pretrained(request, tmp_path_factory):
    """A pretraining run in one precision: (snapshot dir, precision, its datamodule)."""
    d, dm = tmp_path_factory.mktemp(request.param), Float32Blobs()
    _fit(request.param, PretrainingSnapshot(d, progress=False), dm)
    return d, request.param, dm


def _finetune(d, precision: str, mode: str) -> MultiStageInfluence:
    cb = MultiStageInfluence(d, progress=False, report=False, enforce_proximal=mode == "updated", **SETTINGS[mode])
    _fit(precision, cb, Float32Blobs(n=11, classes=2, seed=5), d, classes=2, init_seed=1,
         freeze_backbone=mode == "fixed")
    return cb


def _float64(d, stage: str, round_to: torch.dtype = torch.float64, **kwargs) -> TinyModule:
    """A float64 ``TinyModule`` with a snapshot's weights (first rounded to ``round_to``)."""
    module = TinyModule(**kwargs)
    weights = SnapshotDir(d).load_stage(stage)[1]
    module.load_state_dict({k: v.to(round_to).double() for k, v in weights.items()})
    return module


def _reference(d, mode: str, pretrain_round_to: torch.dtype = torch.float64) -> torch.Tensor:
    pre = _float64(d, "pretrain", pretrain_round_to)
    fine = _float64(d, "finetune", classes=2, freeze_backbone=mode == "fixed")
    pre_dm, dm = Float32Blobs(), Float32Blobs(n=11, classes=2, seed=5)
    pre_dm.setup("fit")
    dm.setup("fit")
    return multistage_influence(pre, fine, pre_dm.train_set, dm.train_set, dm.val_set, shared="backbone",
                                **SETTINGS[mode])


def _assert_close(scores: torch.Tensor, ref: torch.Tensor, precision: str) -> None:
    """float64 to 1e-6; float32 (every narrower precision is computed in it, on its weights exactly) to 1e-4."""
    assert rel_err(scores.double(), ref) <= (1e-6 if precision == "64-true" else 1e-4)


@pytest.mark.parametrize("mode", ["fixed", "updated"])
def test_every_precision_scores_like_float64_on_its_weights(pretrained, mode):
    d, precision, _ = pretrained
    cb = _finetune(d, precision, mode)
    trained = TRAINED[precision]
    assert SnapshotDir(d).load_stage("pretrain")[1]["backbone.0.weight"].dtype == trained  # weights as trained
    assert SnapshotDir(d).load_stage("finetune")[1]["head.weight"].dtype == trained
    assert cb.scores.dtype == (torch.float64 if trained == torch.float64 else torch.float32)
    assert torch.isfinite(cb.scores).all()
    _assert_close(cb.scores, _reference(d, mode), precision)
    if mode == "fixed":  # both stages rebuilt from their snapshots (once per precision: it is the same code)
        again = rescore(d, progress=False).scores
        assert again.dtype == cb.scores.dtype and rel_err(again, cb.scores) <= 1e-6


@pytest.mark.parametrize("pretrained", ["32-true"], indirect=True)
def test_a_narrower_finetune_precision_rounds_the_pretraining_side_alike(pretrained):
    """float32 pretraining, bf16 finetuning of a frozen backbone: both stages are bf16 models, scored in float32."""
    d, _, _ = pretrained
    cb = _finetune(d, "bf16-true", "fixed")
    _assert_close(cb.scores, _reference(d, "fixed", pretrain_round_to=torch.bfloat16), "bf16-true")


@pytest.mark.parametrize("pretrained", ["64-true"], indirect=True)
def test_a_backbone_rounded_before_conversion_is_refused_before_training(pretrained):
    """A float32 module given float64 weights, then converted by "64-true": its backbone is not the pretrained one."""
    d, _, _ = pretrained
    module = load_pretrained(DefaultDtypeModule(classes=2, init_seed=1, freeze_backbone=True), d)
    before = [p.detach().clone() for p in module.parameters()]
    cb = MultiStageInfluence(d, progress=False, **SETTINGS["fixed"])
    with pytest.raises(MSIFError, match=r"precision this trainer trains in \(torch.float64\).*init_module"):
        trainer(precision="64-true", callbacks=[cb]).fit(module, datamodule=Float32Blobs(n=11, classes=2, seed=5))
    assert all(torch.equal(a, b.float()) for a, b in zip(before, module.parameters()))  # no training step ran


def test_the_pretraining_callbacks_computations_on_a_bf16_model_run_in_float32(tmp_path):
    """Stored gradients, the fitted EK-FAC and the gradient index of a bf16 model come from a float32 copy."""
    dm = Float32Blobs()
    _fit("bf16-true", PretrainingSnapshot(tmp_path, progress=False, store_gradients=True, curvature="ekfac",
                                          index_dim=2), dm)
    snapshots = SnapshotDir(tmp_path)
    stored = snapshots.read_gradients(str(snapshots.manifest("pretrain").weights.sha256),
                                      ["backbone.0.weight", "backbone.0.bias", "head.weight", "head.bias"])
    ref, _ = per_example_gradients(_float64(tmp_path, "pretrain"), dm.train_set, shared="backbone")
    assert stored.dtype == torch.float32
    assert rel_err(stored.double(), ref) <= 1e-5
    (factors,) = (tmp_path / "pretrain" / "curvature").glob("ekfac-*.safetensors")
    assert {t.dtype for t in load_file(factors).values()} == {torch.float32}
    assert load_file(tmp_path / "pretrain" / "index" / "projection.safetensors")["0.a"].dtype == torch.float32


def test_16_mixed_on_cpu_runs_as_bf16_mixed():
    """Lightning has no float16 autocast on CPU: it warns and trains in "bf16-mixed", which the tests above cover."""
    with pytest.warns(UserWarning, match="not supported on CPU"):
        t = trainer(precision="16-mixed")
    assert t.precision == "bf16-mixed"


def test_an_enclosing_autocast_does_not_lower_the_computation():
    """Scores computed inside a mixed-precision region are the float32 ones (autocast is off while computing)."""
    pre, fine = DefaultDtypeModule(), DefaultDtypeModule(classes=2, init_seed=1, freeze_backbone=True)
    fine.backbone.load_state_dict(pre.backbone.state_dict())
    pre_dm, dm = Float32Blobs(), Float32Blobs(n=11, classes=2, seed=5)
    pre_dm.setup("fit")
    dm.setup("fit")

    def scores() -> torch.Tensor:
        return multistage_influence(pre, fine, pre_dm.train_set, dm.train_set, dm.val_set, shared="backbone",
                                    **SETTINGS["fixed"])

    plain = scores()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = scores()
    assert inside.dtype == torch.float32 and rel_err(inside, plain) <= 1e-5  # float32 noise; bf16 kernels gave 4e-2
