"""What the stages leave on disk (``SnapshotDir``), written atomically and verified on load.

Also the records that rebuild a module or datamodule from a snapshot, and data fingerprints.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils._pytree import tree_flatten

from .atomic import PathLike, save_tensors, save_yaml, sha256_file
from .core.index import GradientIndex
from .core.params import shared_names
from .errors import MSIFError
from .trust import Trust, load_class, sign
from .version import __version__

FORMAT_VERSION = 1


# -- records: how to rebuild a module or a datamodule ---------------------------------------------
def class_record(obj: Any) -> Optional[Dict[str, Any]]:
    """``{class_path, hparams, signature}`` for an object that ``class_path(**hparams)`` rebuilds, else None.

    The hyperparameters are stored as a YAML read gives them back, so the signature (``trust.sign``, this
    user's key) covers exactly what ``rebuild`` will pass to the class.
    """
    hparams = getattr(obj, "hparams", None)
    if hparams is None:
        return None
    try:
        text = OmegaConf.to_yaml(OmegaConf.create(dict(hparams)), resolve=True)
    except Exception:  # hyperparameters that YAML cannot hold (objects, tensors): not rebuildable
        return None
    cls = type(obj)
    plain = OmegaConf.to_container(OmegaConf.create(text))
    if not _rebuilds(cls, plain):
        return None
    return sign({"class_path": f"{cls.__module__}.{cls.__qualname__}", "hparams": plain})


def _rebuilds(cls: type, hparams: Mapping[str, Any]) -> bool:
    """Whether ``cls(**hparams)`` is a call that built the object: the saved hyperparameters fill the constructor's
    arguments, and with none saved (no ``save_hyperparameters()``) only a constructor that takes none qualifies
    (its defaults may not be the values the object was built with)."""
    try:
        signature = inspect.signature(cls)
        signature.bind(**hparams)
    except (TypeError, ValueError):
        return False
    return bool(hparams) or not signature.parameters


def rebuild(record: Mapping[str, Any], kind: str, what: str, trust: Trust, hint: str) -> Any:
    """``class_path(**hparams)`` from a ``kind`` (``module`` / ``datamodule``) record the ``trust`` policy admits
    (checked before anything is imported); ``hint`` says how to pass the object instead."""
    plain = OmegaConf.to_container(record) if isinstance(record, DictConfig) else dict(record)
    cls = load_class(plain, kind, what, trust, hint)
    hparams = plain.get("hparams") or {}
    if not isinstance(hparams, dict):
        raise MSIFError(f"The snapshot's {what} record holds hparams of type {type(hparams).__name__}, not a "
                        f"mapping of keyword arguments. Pass the {what} explicitly ({hint}).")
    return cls(**hparams)


# -- YAML files of a snapshot ------------------------------------------------------------------------
def read_yaml(path: PathLike) -> DictConfig:
    """A snapshot's YAML file as plain values: a safe loader (``!!python`` tags refused but OmegaConf's
    ``pathlib`` paths) and no ``${...}`` interpolation (resolving one could call a resolver the application
    registered, e.g. an ``eval``)."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise MSIFError(f"{path} is not a plain YAML file as lightning-msif writes it ({problem}): it holds a "
                        "Python tag or is malformed. Take that snapshot again, or remove the file.") from None
    if not isinstance(cfg, DictConfig):
        raise MSIFError(f"{path} holds a {type(cfg).__name__}, not a mapping: take that snapshot again.")
    _refuse_interpolations(OmegaConf.to_container(cfg, resolve=False), path)
    return cfg


def _refuse_interpolations(value: Any, path: PathLike) -> None:
    """Refuse any ``${`` in the strings of ``value`` (nested dicts and lists)."""
    if isinstance(value, str) and "${" in value:
        raise MSIFError(f"{path} holds the interpolation {value!r}; a snapshot's YAML is read as plain values and "
                        "lightning-msif never writes one. Take that snapshot again.")
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, (dict, list)):
        for item in items:
            _refuse_interpolations(item, path)


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
    params = dict(module.named_parameters())
    return {n: list(params[n].shape) for n in shared_names(params, shared)}


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


class FactorFiles:
    """A ``FactorStore`` of fitted curvatures in a folder, valid for one set of weights (hash checked on read)."""

    def __init__(self, folder: PathLike, weights_sha: str):
        self.folder, self.weights_sha = Path(folder), weights_sha

    def get(self, key: str) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        path = self.folder / f"{key}.safetensors"
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("weights_sha256") != self.weights_sha or meta.get("format_version") != str(FORMAT_VERSION):
                return None  # fitted on other weights (or by another version): refit
            return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(meta["meta"])

    def put(self, key: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        save_tensors(self.folder / f"{key}.safetensors", tensors,
                     metadata={"meta": json.dumps(meta), "weights_sha256": self.weights_sha,
                               "format_version": str(FORMAT_VERSION)})


class IndexFiles:
    """An ``IndexStore``: one safetensors file per block of a gradient index, in one folder (atomic writes)."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str) -> torch.Tensor:
        return load_file(str(self._path(key)))["rows"]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        save_tensors(self._path(key), {"rows": tensor})

    def keys(self) -> List[str]:
        return sorted(p.name[: -len(".safetensors")] for p in self.folder.glob("*.safetensors"))

    def remove(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


# -- the folder ---------------------------------------------------------------------------------------
class SnapshotDir:
    """The files a two-stage run leaves under one folder: the only code that knows their names and format.

    Layout::

        pretrain/manifest.yaml  pretrain/weights.safetensors  [pretrain/gradients.safetensors]
        pretrain/curvature/<kind>-<key>.safetensors   fitted pretraining curvature (EK-FAC factors)
        pretrain/index/manifest.yaml  projection.safetensors  rows.<start>-<stop>.safetensors   gradient index
        finetune/manifest.yaml  finetune/weights.safetensors
        work/<key>/*.safetensors     partial results of an unfinished scoring run
        scores.safetensors  scores.yaml   the score matrix and how it was computed
        report/                      CSV tables and report.html

    A manifest records the format version, library versions, the shared parameters' names and shapes,
    a hash of the weights, how to rebuild the module and the data (class path + hyperparameters), and
    a fingerprint of the training data, so a later stage can refuse a snapshot that does not fit.
    """

    WEIGHTS = "weights.safetensors"
    MANIFEST = "manifest.yaml"
    GRADIENTS = "gradients.safetensors"
    SCORES = "scores.safetensors"
    SCORES_RECORD = "scores.yaml"

    def __init__(self, root: PathLike):
        self.root = Path(root)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"SnapshotDir({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------------------
    def weights_path(self, stage: str) -> Path:
        return self.root / stage / self.WEIGHTS

    @property
    def scores_path(self) -> Path:
        return self.root / self.SCORES

    @property
    def scores_files(self) -> List[Path]:
        """What a W&B artifact of the scores holds."""
        return [self.scores_path, self.root / self.SCORES_RECORD]

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def factors(self, weights_sha: str) -> FactorFiles:
        """The fitted pretraining curvatures valid for the pretraining weights ``weights_sha``."""
        return FactorFiles(self.root / "pretrain" / "curvature", weights_sha)

    def work(self, key: str) -> FileStore:
        """The partial-result store of the scoring run identified by ``key`` (``settings_key``)."""
        return FileStore(self.root / "work" / key)

    # -- stages ----------------------------------------------------------------------------------------
    def write_stage(self, stage: str, module: nn.Module, shared: str, data: Any = None, train_dataset: Any = None,
                    extra: Optional[Dict[str, Any]] = None) -> DictConfig:
        """Weights and manifest of ``module`` for ``stage``; returns the manifest as written."""
        weights = self.weights_path(stage)
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
        save_yaml(self.root / stage / self.MANIFEST, manifest)
        return OmegaConf.create(manifest)

    def manifest(self, stage: str) -> DictConfig:
        """The stage's manifest, after checking it exists, is of this format version and is intact."""
        folder = self.root / stage
        path = folder / self.MANIFEST
        if not path.exists():
            callback = {"pretrain": "PretrainingSnapshot", "finetune": "MultiStageInfluence"}.get(stage, "its callback")
            hint = (f"run the {stage} stage with {callback}(snapshot_dir=...) first, or point snapshot_dir at the "
                    "folder it wrote")
            raise MSIFError(f"No {stage} snapshot in {folder}: {hint}.")
        manifest = read_yaml(path)
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            written = OmegaConf.select(manifest, "versions.lightning_msif", default="an unknown version")
            raise MSIFError(
                f"The {stage} snapshot in {folder} has format version {version} (written by lightning-msif "
                f"{written}); this lightning-msif ({__version__}) reads format {FORMAT_VERSION}. Re-run that "
                "stage with this version, or install the version that wrote it."
            )
        weights = self.weights_path(stage)  # never a path the manifest names: it may point out of the folder
        if not weights.exists() or sha256_file(weights) != manifest.weights.sha256:
            raise MSIFError(
                f"The {stage} weights {weights} are missing or do not match the hash in its manifest (a partial "
                "copy or a file from another run). Re-run that stage to write a consistent snapshot."
            )
        return manifest

    def load_stage(self, stage: str) -> Tuple[DictConfig, Dict[str, torch.Tensor]]:
        """The verified manifest and the weights of ``stage``."""
        manifest = self.manifest(stage)
        return manifest, load_file(str(self.weights_path(stage)))

    # -- stored per-example gradients of the pretraining set -----------------------------------------------
    def write_gradients(self, gradients: torch.Tensor, names: Iterable[str], weights_sha: str) -> Path:
        """``[n, dim]`` rows in dataset order, columns in ``names`` order; ``projection`` recorded (``none``)."""
        meta = {"format_version": str(FORMAT_VERSION), "projection": "none", "names": json.dumps(list(names)),
                "weights_sha256": weights_sha}
        return save_tensors(self.root / "pretrain" / self.GRADIENTS, {"gradients": gradients}, metadata=meta)

    def read_gradients(self, weights_sha: str, names: Iterable[str]) -> Optional[torch.Tensor]:
        """Stored pretraining gradients if they were taken on these weights, in this parameter order; else None."""
        path = self.root / "pretrain" / self.GRADIENTS
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            fits = (meta.get("projection") == "none" and meta.get("weights_sha256") == weights_sha
                    and json.loads(meta.get("names", "[]")) == list(names))
            return fh.get_tensor("gradients") if fits else None

    # -- the gradient index of the pretraining set -------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        return self.root / "pretrain" / "index"

    def open_index(self, spec: Dict[str, Any]) -> IndexFiles:
        """The index folder for a capture described by ``spec`` (projection, weights hash, data fingerprint,
        dtype, block): an index with another description is removed first; a matching one is kept (resume)."""
        spec = {"format_version": FORMAT_VERSION, **spec}
        if self.index_spec() != spec:
            shutil.rmtree(self.index_dir, ignore_errors=True)
            save_yaml(self.index_dir / self.MANIFEST, {**spec, "complete": False})
        return IndexFiles(self.index_dir)

    def index_pieces(self) -> IndexFiles:
        """Rows caught during training, by block and rank, until they are assembled into the index."""
        return IndexFiles(self.root / "pretrain" / "index-pieces")

    def remove_index_pieces(self) -> None:
        """Remove rows caught during training that were not assembled (e.g. left by an interrupted run)."""
        shutil.rmtree(self.root / "pretrain" / "index-pieces", ignore_errors=True)

    def remove_index(self) -> None:
        """Remove the gradient index (e.g. one left by an earlier pretraining run, of other weights)."""
        shutil.rmtree(self.index_dir, ignore_errors=True)

    def index_store(self) -> IndexFiles:
        """The blocks of the gradient index (``open_index`` first)."""
        return IndexFiles(self.index_dir)

    def finish_index(self, projection: Dict[str, Any], duals: Dict[str, torch.Tensor],
                     steps: Optional[Dict[str, Any]] = None) -> None:
        """Mark the index complete (every block written), with the projection it was taken with, the matrices
        that project vectors alike and, for rows caught in training steps, how many were (``steps``)."""
        save_tensors(self.index_dir / "projection.safetensors", duals)
        save_yaml(self.index_dir / self.MANIFEST, {**(self.index_spec() or {}), "projection": projection,
                                                   "steps": steps, "complete": True})

    def _index_manifest(self) -> Optional[Dict[str, Any]]:
        path = self.index_dir / self.MANIFEST
        return OmegaConf.to_container(read_yaml(path)) if path.exists() else None

    def index_spec(self) -> Optional[Dict[str, Any]]:
        """The description of the index in the folder (without what is written when the capture finishes), or
        None."""
        manifest = self._index_manifest()
        if manifest is None:
            return None
        return {k: v for k, v in manifest.items() if k not in ("complete", "projection", "steps")}

    def read_index(self, weights_sha: str, dataset: Any) -> Optional[GradientIndex]:
        """The complete gradient index taken on these pretraining weights and this data, or None when there is
        none; an error when the folder holds one that does not fit (other weights, other data, unfinished)."""
        spec = self._index_manifest()
        if spec is None:
            return None
        complete = bool(spec.get("complete"))
        problems = []
        if spec.get("format_version") != FORMAT_VERSION:
            problems.append(f"format version {spec.get('format_version')} (this library reads {FORMAT_VERSION})")
        if spec.get("weights_sha256") != weights_sha:
            problems.append("other pretraining weights")
        if dataset is not None and spec.get("fingerprint") != fingerprint(dataset):
            problems.append("other pretraining data")
        if not complete:
            problems.append("an unfinished capture")
        if problems:
            raise MSIFError(f"The gradient index in {self.index_dir} does not fit this run: {', '.join(problems)}. "
                            "Capture it again (PretrainingSnapshot(index_dim=...) at the end of pretraining), or "
                            "delete that folder to score without it.")
        duals = load_file(str(self.index_dir / "projection.safetensors"))
        return GradientIndex(IndexFiles(self.index_dir), int(spec["n"]), spec["projection"], duals, int(spec["block"]))

    # -- the score matrix ------------------------------------------------------------------------------
    def write_scores(self, scores: torch.Tensor, record: Dict[str, Any]) -> Path:
        """``scores.safetensors`` (``scores``, ``pretrain_indices``, ``query_indices``) and ``scores.yaml``."""
        text = OmegaConf.to_yaml(OmegaConf.create(record))
        n, k = scores.shape
        save_tensors(self.scores_path,
                     {"scores": scores, "pretrain_indices": torch.arange(n), "query_indices": torch.arange(k)},
                     metadata={"manifest": text, "format_version": str(FORMAT_VERSION)})
        save_yaml(self.root / self.SCORES_RECORD, record)
        return self.scores_path

    def scores_record(self) -> Optional[DictConfig]:
        """How the last scores were computed (``scores.yaml``), or None before any scoring run."""
        path = self.root / self.SCORES_RECORD
        return read_yaml(path) if path.exists() else None

    def read_scores(self) -> Tuple[torch.Tensor, DictConfig]:
        """The score matrix and its record."""
        record = self.scores_record()
        if not self.scores_path.exists() or record is None:
            raise MSIFError(
                f"No {self.SCORES} in {self.root}: the finetune stage (or `msif score`) writes it after training."
            )
        return load_file(str(self.scores_path))["scores"], record
