"""What a stage leaves on disk, written atomically and verified on load.

Layout under ``snapshot_dir``::

    pretrain/manifest.yaml   pretrain/weights.safetensors   (the pretraining stage)
    finetune/manifest.yaml   finetune/weights.safetensors   (the finetune stage)
    work/<key>/*.safetensors                               (partial results of an unfinished scoring run)
    scores.safetensors  scores.yaml                        (the score matrix and how it was computed)

A manifest records the format version, library versions, the shared parameters' names and shapes,
a hash of the weights, how to rebuild the module and the data (class path + hyperparameters), and
a fingerprint of the training data, so a later stage can refuse a snapshot that does not fit.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._pytree import tree_flatten

from .version import __version__
from .errors import MSIFError

FORMAT_VERSION = 1
STAGES = ("pretrain", "finetune")
SCORES_FILE = "scores.safetensors"
PathLike = Union[str, os.PathLike]


# -- atomic files --------------------------------------------------------------------------------
def _atomic(path: Path, write: Any) -> None:
    """Run ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Atomic safetensors write (tensors copied to contiguous CPU memory, ties broken)."""
    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def save_bytes(path: Path, data: bytes) -> None:
    """Atomic binary write."""
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def save_text(path: Path, text: str) -> None:
    """Atomic text write."""
    _atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_yaml(path: Path, cfg: Any) -> None:
    save_text(path, OmegaConf.to_yaml(OmegaConf.create(cfg)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- records: how to rebuild a module or a datamodule ---------------------------------------------
def class_record(obj: Any) -> Optional[Dict[str, Any]]:
    """``{class_path, hparams}`` for an object with saved hyperparameters, else None."""
    hparams = getattr(obj, "hparams", None)
    if hparams is None:
        return None
    try:
        plain = OmegaConf.to_container(OmegaConf.create(dict(hparams)), resolve=True)
    except Exception:  # hyperparameters that YAML cannot hold (objects, tensors): not rebuildable
        return None
    cls = type(obj)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "hparams": plain}


def rebuild(record: Mapping[str, Any], what: str) -> Any:
    """Instantiate ``class_path(**hparams)`` from a record."""
    path = str(record["class_path"])
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise MSIFError(
            f"Cannot rebuild the {what} from the snapshot: {path!r} is not importable here ({err}). Make "
            f"its module importable (install it or add it to PYTHONPATH), or pass the {what} explicitly."
        ) from err
    hp = record.get("hparams") or {}
    return cls(**(OmegaConf.to_container(hp) if isinstance(hp, DictConfig) else dict(hp)))


# -- data fingerprints --------------------------------------------------------------------------
def fingerprint(dataset: Any, samples: int = 32) -> Dict[str, Any]:
    """Length and a hash of evenly spaced examples: detects other data without reading all of it."""
    n = len(dataset)
    h = hashlib.sha256()
    for i in sorted({round(j * (n - 1) / max(samples - 1, 1)) for j in range(min(samples, n))}):
        for leaf in tree_flatten(dataset[i])[0]:
            if isinstance(leaf, torch.Tensor):
                h.update(leaf.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(leaf).encode())
    return {"n": n, "sha256": h.hexdigest()}


def check_fingerprint(expected: Mapping[str, Any], dataset: Any, what: str) -> None:
    got = fingerprint(dataset)
    if int(expected["n"]) != got["n"] or str(expected["sha256"]) != got["sha256"]:
        raise MSIFError(
            f"The {what} differs from the one the pretraining snapshot was taken on (snapshot: "
            f"{expected['n']} examples, hash {str(expected['sha256'])[:12]}; now: {got['n']} examples, hash "
            f"{got['sha256'][:12]}). Scores would not index the pretraining set: pass the same data "
            "(same order, same preprocessing) or take a new pretraining snapshot."
        )


# -- stage snapshots -----------------------------------------------------------------------------
def versions() -> Dict[str, str]:
    import lightning

    return {"lightning_msif": __version__, "torch": str(torch.__version__), "lightning": str(lightning.__version__),
            "python": platform.python_version()}


def shared_shapes(module: nn.Module, shared: str) -> Dict[str, list]:
    return {n: list(p.shape) for n, p in module.named_parameters() if n == shared or n.startswith(shared + ".")}


def write_stage(snapshot_dir: PathLike, stage: str, module: nn.Module, shared: str,
                data: Any = None, train_dataset: Any = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Weights and manifest of ``module`` for ``stage``; returns the stage folder."""
    folder = Path(snapshot_dir) / stage
    weights = folder / "weights.safetensors"
    save_tensors(weights, dict(module.state_dict()), metadata={"format_version": str(FORMAT_VERSION)})
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "shared": shared,
        "shared_params": shared_shapes(module, shared),
        "trainable": [n for n, p in module.named_parameters() if p.requires_grad],
        "weights": {"file": weights.name, "sha256": sha256_file(weights)},
        "module": class_record(module),
        "data": class_record(data) if data is not None else None,
        "fingerprint": fingerprint(train_dataset) if train_dataset is not None else None,
        **(extra or {}),
    }
    save_yaml(folder / "manifest.yaml", manifest)
    return folder


def read_manifest(snapshot_dir: PathLike, stage: str) -> DictConfig:
    """The stage's manifest, after checking it exists, is of this format version and is intact."""
    folder = Path(snapshot_dir) / stage
    path = folder / "manifest.yaml"
    if not path.exists():
        hint = (f"run the {stage} stage with MultiStageInfluence(stage={stage!r}, snapshot_dir=...) first, "
                "or point snapshot_dir at the folder it wrote")
        raise MSIFError(f"No {stage} snapshot in {folder}: {hint}.")
    manifest = OmegaConf.load(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        written = OmegaConf.select(manifest, "versions.lightning_msif", default="an unknown version")
        raise MSIFError(
            f"The {stage} snapshot in {folder} has format version {version} (written by lightning-msif "
            f"{written}); this lightning-msif ({__version__}) reads format {FORMAT_VERSION}. Re-run that "
            "stage with this version, or install the version that wrote it."
        )
    weights = folder / manifest.weights.file
    if not weights.exists() or sha256_file(weights) != manifest.weights.sha256:
        raise MSIFError(
            f"The {stage} weights {weights} are missing or do not match the hash in its manifest (a partial "
            "copy or a file from another run). Re-run that stage to write a consistent snapshot."
        )
    return manifest


def read_weights(snapshot_dir: PathLike, stage: str) -> Tuple[DictConfig, Dict[str, torch.Tensor]]:
    manifest = read_manifest(snapshot_dir, stage)
    return manifest, load_file(str(Path(snapshot_dir) / stage / manifest.weights.file))


def check_shared(manifest: DictConfig, module: nn.Module, shared: str) -> None:
    """The module's shared parameters have the snapshot's names and shapes (same prefix too)."""
    if manifest.shared != shared:
        raise MSIFError(
            f"The pretraining snapshot was taken with shared={manifest.shared!r} but this stage uses "
            f"shared={shared!r}: use the same prefix in both callbacks."
        )
    want = {k: list(v) for k, v in manifest.shared_params.items()}
    have = shared_shapes(module, shared)
    if want != have:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shapes = [f"{k}: {want[k]} → {have[k]}" for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        raise MSIFError(
            f"The shared parameters under {shared!r} do not match the pretraining snapshot: missing "
            f"{missing[:5]}, unexpected {extra[:5]}, other shapes {shapes[:5]}. The finetune module must hold "
            "the same shared module as the pretraining one."
        )


# -- stored per-example gradients of the pretraining set -------------------------------------------
GRADIENTS_FILE = "gradients.safetensors"


def write_gradients(snapshot_dir: PathLike, gradients: torch.Tensor, names: Iterable[str], weights_sha: str) -> Path:
    """``pretrain/gradients.safetensors``: ``[n, dim]`` rows in dataset order, columns in ``names`` order.

    ``projection`` is recorded (``none`` today) so compressed or projected stores can follow.
    """
    path = Path(snapshot_dir) / "pretrain" / GRADIENTS_FILE
    meta = {"format_version": str(FORMAT_VERSION), "projection": "none", "names": json.dumps(list(names)),
            "weights_sha256": weights_sha}
    save_tensors(path, {"gradients": gradients}, metadata=meta)
    return path


def read_gradients(snapshot_dir: PathLike, weights_sha: str, names: Iterable[str]) -> Optional[torch.Tensor]:
    """Stored pretraining gradients if they were taken on these weights, in this parameter order; else None."""
    path = Path(snapshot_dir) / "pretrain" / GRADIENTS_FILE
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        fits = (meta.get("projection") == "none" and meta.get("weights_sha256") == weights_sha
                and json.loads(meta.get("names", "[]")) == list(names))
        return fh.get_tensor("gradients") if fits else None


# -- resumable partial results -----------------------------------------------------------------
class FileStore:
    """A ``ScoreStore`` backed by one safetensors file per key in a folder (atomic writes)."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> Optional[torch.Tensor]:
        path = self._path(key)
        return load_file(str(path))["t"] if path.exists() else None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        save_tensors(self._path(key), {"t": tensor})

    def clear(self) -> None:
        """Remove this run's partial results (and the work folder once it is empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:  # other runs' partial results are still there
            pass


def settings_key(parts: Iterable[Any]) -> str:
    """Short hash naming the work folder of one exact computation."""
    return hashlib.sha256(repr(list(parts)).encode()).hexdigest()[:16]


# -- the score matrix ---------------------------------------------------------------------------
def write_scores(snapshot_dir: PathLike, scores: torch.Tensor, manifest: Dict[str, Any]) -> Path:
    """``scores.safetensors`` (keys ``scores``, ``pretrain_indices``, ``query_indices``) and ``scores.yaml``."""
    folder = Path(snapshot_dir)
    text = OmegaConf.to_yaml(OmegaConf.create(manifest))
    n, k = scores.shape
    path = folder / SCORES_FILE
    save_tensors(path, {"scores": scores, "pretrain_indices": torch.arange(n), "query_indices": torch.arange(k)},
                 metadata={"manifest": text, "format_version": str(FORMAT_VERSION)})
    save_yaml(folder / "scores.yaml", manifest)
    return path


def read_scores(snapshot_dir: PathLike) -> Tuple[torch.Tensor, DictConfig]:
    """The score matrix and its manifest."""
    path = Path(snapshot_dir) / SCORES_FILE
    if not path.exists():
        raise MSIFError(
            f"No {SCORES_FILE} in {snapshot_dir}: the finetune stage (or `msif score`) writes it after training."
        )
    manifest = OmegaConf.load(Path(snapshot_dir) / "scores.yaml")
    return load_file(str(path))["scores"], manifest
