"""A snapshot from elsewhere never runs code: records are rebuilt only when trusted, and only Lightning classes;
YAML is read without Python tags or interpolations; tensors only through safetensors / weights_only."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lightning_fixtures import TinyDataModule, TinyModule
from omegaconf import OmegaConf

from lightning_msif import InfluenceArguments, MSIFError, MultiStageInfluence, SnapshotDir, rescore
from lightning_msif.snapshots import save_manifest
from lightning_msif.cli import main
from lightning_msif.resolve import from_snapshots
from lightning_msif.trust import CLASSES_ENV, KEY_ENV, Trust

HERE = Path(__file__).parent
PACKAGE = HERE.parent / "lightning_msif"
ARGS = InfluenceArguments(mode="updated", alpha=0.5, damping=0.5, solver="exact")
SLOTS = [("pretrain", "module"), ("pretrain", "data"), ("finetune", "module"), ("finetune", "data")]


class Touch:
    """Not a Lightning class: calling it leaves the marker file it is given."""

    def __init__(self, command: str):
        Path(command.split()[-1]).touch()


ATTACKS = {  # keyword arguments that make each call create the marker (``eval`` takes none: it would fail)
    "os.system": lambda marker: {"command": f"touch {marker}"},
    "subprocess.Popen": lambda marker: {"args": f"touch {marker}", "shell": True},
    "builtins.eval": lambda marker: {"source": f"open({str(marker)!r}, 'w')"},
    "test_security.Touch": lambda marker: {"command": f"touch {marker}"},
}
HOSTILE = list(ATTACKS)


def _hostile(class_path: str, marker: Path) -> dict:
    """A record that, if called, creates ``marker``."""
    return {"class_path": class_path, "hparams": ATTACKS[class_path](marker)}


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """Both stages' snapshots, written here by this user (signed with the session's key)."""
    d = tmp_path_factory.mktemp("own")
    pre_dm, fine_dm = TinyDataModule(), TinyDataModule(n=11, classes=2, seed=5)
    pre_dm.setup("fit")
    fine_dm.setup("fit")
    snapshots = SnapshotDir(d)
    snapshots.write_stage("pretrain", TinyModule(), "backbone", data=pre_dm, train_dataset=pre_dm.train_set)
    snapshots.write_stage("finetune", TinyModule(classes=2, init_seed=1), "backbone", data=fine_dm,
                          train_dataset=fine_dm.train_set, extra={"query": "val"})
    return d


@pytest.fixture
def copy(own, tmp_path) -> Path:
    folder = tmp_path / "snapshot"
    shutil.copytree(own, folder)
    return folder


def _edit(folder: Path, stage: str, slot: str, record) -> None:
    """Replace a record of ``stage``'s manifest (the weights and their hash stay intact), and seal the manifest's
    field hash again, as whoever edits a manifest can: that hash finds damage, not intent."""
    path = folder / stage / "manifest.yaml"
    manifest = OmegaConf.to_container(OmegaConf.load(path))
    manifest[slot] = record
    save_manifest(path, manifest)


def _msif(*args: str, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "lightning_msif", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **env}, timeout=300)


# -- a hostile record is refused, through every entry point, before it is imported or called ---------------
@pytest.mark.parametrize("class_path", HOSTILE)
@pytest.mark.parametrize("stage, slot", SLOTS)
def test_resolver_refuses_a_record_naming_other_code(copy, tmp_path, stage, slot, class_path):
    marker = tmp_path / "marker"
    _edit(copy, stage, slot, _hostile(class_path, marker))
    with pytest.raises(MSIFError, match=rf"names '{class_path}', which was not imported: its record is not signed"):
        from_snapshots(SnapshotDir(copy))
    assert not marker.exists()


@pytest.mark.parametrize("class_path", HOSTILE)
def test_rescore_refuses_a_record_naming_other_code(copy, tmp_path, class_path):
    marker = tmp_path / "marker"
    _edit(copy, "pretrain", "module", _hostile(class_path, marker))
    with pytest.raises(MSIFError, match=r"trust_records=True.*trusted_classes=") as err:
        rescore(copy, ARGS, progress=False)
    assert class_path in str(err.value) and "pretrain_model=..." in str(err.value)
    assert not marker.exists() and not (copy / "scores.safetensors").exists()


@pytest.mark.parametrize("class_path", HOSTILE)
def test_cli_refuses_a_record_naming_other_code(copy, tmp_path, class_path):
    marker = tmp_path / "marker"
    _edit(copy, "finetune", "data", _hostile(class_path, marker))
    proc = _msif("score", f"snapshot_dir={copy}", "mode=updated", "alpha=0.5", "progress=false")
    assert proc.returncode == 2, proc.stderr
    assert f"names '{class_path}', which was not imported" in proc.stderr and "trust_records=true" in proc.stderr
    assert not marker.exists()


def test_nothing_is_imported_before_the_trust_check(copy, tmp_path, monkeypatch):
    """Importing a module can run code: a record naming one is refused before the import."""
    marker = tmp_path / "imported"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _edit(copy, "pretrain", "module", {"class_path": "planted.Net", "hparams": {}})
    with pytest.raises(MSIFError, match="'planted.Net', which was not imported"):
        rescore(copy, ARGS, progress=False)
    assert not marker.exists() and "planted" not in sys.modules


@pytest.mark.parametrize("class_path", ["os.system", "subprocess.Popen", "test_security.Touch"])
def test_trusted_records_must_still_be_lightning_classes(copy, tmp_path, class_path):
    """trust_records / the allow-list let a record be imported, never called unless it is a Lightning class."""
    marker = tmp_path / "marker"
    _edit(copy, "pretrain", "module", _hostile(class_path, marker))
    with pytest.raises(MSIFError, match=rf"'{class_path}', which is not a LightningModule subclass: it was not called"):
        rescore(copy, ARGS, progress=False, trust_records=True)
    with pytest.raises(MSIFError, match="not a LightningModule subclass"):
        rescore(copy, ARGS, progress=False, trusted_classes=[class_path])
    _edit(copy, "pretrain", "module", None)
    _edit(copy, "pretrain", "data", _hostile(class_path, marker))
    with pytest.raises(MSIFError, match="not a LightningDataModule subclass"):
        rescore(copy, ARGS, progress=False, pretrain_model=TinyModule(), trust_records=True)
    assert not marker.exists()


# -- what is trusted: this user's own snapshots, or an explicit opt-in ----------------------------------------
def test_own_snapshot_rebuilds_without_any_option(copy):
    outcome = rescore(copy, ARGS, progress=False)
    assert tuple(outcome.scores.shape) == (13, 5)
    assert OmegaConf.load(copy / "pretrain" / "manifest.yaml").module.signature


def test_a_copied_snapshot_needs_the_opt_in(copy, tmp_path, monkeypatch):
    """Another user's (or machine's) key: refused until trusted by one of the three opt-ins."""
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other" / "snapshot.key"))
    with pytest.raises(MSIFError, match=r"not written by this user on this machine: this user has no snapshot key"):
        rescore(copy, ARGS, progress=False)
    SnapshotDir(tmp_path / "mine").write_stage("pretrain", TinyModule(), "backbone")  # makes this user's key
    with pytest.raises(MSIFError, match="its signature does not match this user's key"):
        rescore(copy, ARGS, progress=False)
    classes = ["lightning_fixtures.TinyModule", "lightning_fixtures.TinyDataModule"]
    assert rescore(copy, ARGS, progress=False, trust_records=True).scores.shape == (13, 5)
    assert rescore(copy, ARGS, progress=False, trusted_classes=classes).scores.shape == (13, 5)
    monkeypatch.setenv(CLASSES_ENV, ",".join(classes))
    assert rescore(copy, ARGS, progress=False).scores.shape == (13, 5)


def test_the_cli_takes_the_opt_ins(copy, tmp_path, monkeypatch, capsys):
    """Under another user's key (refused as in the test above), the allow-list and trust_records let it rebuild."""
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "other.key"))
    score = ["score", f"snapshot_dir={copy}", "mode=updated", "alpha=0.5", "damping=0.5", "solver=exact",
             "progress=false", "report=false"]
    assert main([*score, "trusted_classes=[lightning_fixtures.TinyModule,lightning_fixtures.TinyDataModule]"]) == 0
    assert main(["report", f"snapshot_dir={copy}", "top_k=1"]) == 0
    assert "examples not shown" in capsys.readouterr().err
    assert main(["report", f"snapshot_dir={copy}", "top_k=1", "trust_records=true"]) == 0
    assert "examples not shown" not in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("class_path", "lightning_fixtures.TinyDataModule"),
                                          ("hparams", {"lr": 9.0})])
def test_an_edited_record_needs_the_opt_in(copy, field, value):
    record = OmegaConf.to_container(OmegaConf.load(copy / "pretrain" / "manifest.yaml").module)
    _edit(copy, "pretrain", "module", {**record, field: value})
    with pytest.raises(MSIFError, match="signature does not match"):
        from_snapshots(SnapshotDir(copy))


def test_an_unsigned_record_needs_the_opt_in(copy):
    """What an older lightning-msif wrote: the same record without signature."""
    record = OmegaConf.to_container(OmegaConf.load(copy / "finetune" / "manifest.yaml").module)
    _edit(copy, "finetune", "module", {k: v for k, v in record.items() if k != "signature"})
    with pytest.raises(MSIFError, match="'lightning_fixtures.TinyModule', which was not imported: its record is not "
                                        "signed"):
        from_snapshots(SnapshotDir(copy))
    assert from_snapshots(SnapshotDir(copy), trust=Trust.of(trust_records=True)).inputs.finetune_model.hparams.lr == 0.3


def test_without_a_key_the_records_are_written_unsigned_with_a_warning(tmp_path, monkeypatch):
    """A home folder where no key can be made: the snapshot is still written; rebuilding it needs an opt-in."""
    (tmp_path / "file").touch()
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "file" / "snapshot.key"))
    with pytest.warns(UserWarning, match="records are not signed: cannot create"):
        manifest = SnapshotDir(tmp_path / "s").write_stage("pretrain", TinyModule(), "backbone")
    assert manifest.module.class_path == "lightning_fixtures.TinyModule" and "signature" not in manifest.module
    with pytest.raises(MSIFError, match="its record is not signed"):
        Trust().check(OmegaConf.to_container(manifest.module), "pretrain module", "pretrain_model=...")


def test_a_key_others_can_read_signs_nothing(copy, snapshot_key):
    os.chmod(snapshot_key, 0o644)
    try:
        with pytest.raises(MSIFError, match="is not private to this user"):
            from_snapshots(SnapshotDir(copy))
    finally:
        os.chmod(snapshot_key, 0o600)


@pytest.mark.parametrize("make", [
    lambda: rescore("nowhere", trusted_classes=["os system"]),
    lambda: MultiStageInfluence("nowhere", trusted_classes=["Net"]),
    lambda: MultiStageInfluence("nowhere", trust_records="yes"),
])
def test_bad_opt_ins_are_refused_before_any_work(make):
    with pytest.raises(MSIFError, match="is not a class path|must be True or False"):
        make()


def test_the_callback_and_its_hydra_config_take_the_opt_ins(tmp_path):
    from hydra.utils import instantiate

    from lightning_msif import MultiStageInfluenceConfig

    cfg = MultiStageInfluenceConfig(snapshot_dir=str(tmp_path), trust_records=True, trusted_classes=["a.B"])
    cb = instantiate(cfg)
    assert cb.trust == Trust(True, frozenset({"a.B"}))


# -- YAML and tensors are read without running code -----------------------------------------------------------
@pytest.mark.parametrize("relative, read", [
    ("pretrain/manifest.yaml", lambda s: s.manifest("pretrain")),
    ("scores.yaml", lambda s: s.scores_record()),
    ("pretrain/index/manifest.yaml", lambda s: s.index_spec()),
])
@pytest.mark.parametrize("payload, message", [
    ("x: !!python/object/apply:os.system ['touch {marker}']\n", "not a plain YAML file"),
    ("x: ${{touch:{marker}}}\n", "holds the interpolation"),
])
def test_yaml_with_python_tags_or_interpolations_is_refused(copy, tmp_path, relative, read, payload, message):
    marker = tmp_path / "marker"
    OmegaConf.register_new_resolver("touch", lambda path: Path(path).touch())  # as an app's `eval` resolver might
    try:
        path = copy / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.read_text() + payload.format(marker=marker) if path.exists() else
                        payload.format(marker=marker))
        with pytest.raises(MSIFError, match=message) as err:
            read(SnapshotDir(copy))
        assert relative.split("/")[-1] in str(err.value)
    finally:
        OmegaConf.clear_resolver("touch")
    assert not marker.exists()


def test_the_manifest_cannot_point_the_weights_out_of_the_folder(copy):
    shutil.move(copy / "pretrain" / "weights.safetensors", copy / "outside.safetensors")
    manifest = OmegaConf.to_container(OmegaConf.load(copy / "pretrain" / "manifest.yaml"))
    manifest["weights"]["file"] = "../outside.safetensors"
    save_manifest(copy / "pretrain" / "manifest.yaml", manifest)
    with pytest.raises(MSIFError, match="are missing or do not match"):
        SnapshotDir(copy).load_stage("pretrain")


YAML_LOADERS = ("OmegaConf.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node, ast.unparse(node.func)


def test_every_load_in_the_package_is_safe():
    """Audit: torch.load only with weights_only=True, YAML only through snapshots.read_yaml, no pickle."""
    unsafe = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE)
        for node, name in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name == "torch.load" and keywords.get("weights_only") != "True":
                unsafe.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            if name in YAML_LOADERS and str(where) != "snapshots.py":
                unsafe.append(f"{where}:{node.lineno} {name} (read YAML with snapshots.read_yaml)")
        imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if {"pickle", "dill", "cloudpickle"} & (imports | modules):
            unsafe.append(f"{where}: imports pickle")
    snapshots = ast.parse((PACKAGE / "snapshots.py").read_text(encoding="utf-8"))
    readers = [f.name for f in ast.walk(snapshots) if isinstance(f, ast.FunctionDef)
               and any(name in YAML_LOADERS for _, name in _calls(f))]
    assert not unsafe and readers == ["read_yaml"], (unsafe, readers)
