"""What the stages leave on disk (``SnapshotDir``), written atomically and verified on load.

Also the records that rebuild a module or datamodule from a snapshot, and data fingerprints.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import platform
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .atomic import (PathLike, fsync_dir, is_stale, remove_stale, save_tensors, save_text, sha256_file, temp_path,
                     temp_target)
from .core.index import GradientIndex
from .core.params import shared_names
from .core.scoring import DenseScores, ScoreMatrix, block_name, block_span
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
FINGERPRINT_SCHEME = "every-example-v2"  # fingerprints of older versions hashed 32 examples only


_NUMPY_SAFE = {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.uint8, torch.bool, torch.complex64, torch.complex128}


def _tensor_bytes(t: torch.Tensor) -> Any:
    """A tensor's raw bytes as a buffer, without a copy where it is already contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.contiguous().cpu()
    if t.dtype in _NUMPY_SAFE:
        return t.numpy().data
    return t.reshape(-1).view(torch.uint8).numpy().data  # bfloat16, float8: their bytes as they are


def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Feed one example (any nesting of tuples, lists and dicts) into ``h``: a tensor or array by dtype, shape
    and raw bytes; a container by its kind, length (and keys); anything else by its type and repr."""
    if isinstance(value, torch.Tensor):
        h.update(_header(value.dtype, value.shape))
        h.update(_tensor_bytes(value))
    elif isinstance(value, (tuple, list)):
        h.update(b"(%d" % len(value))
        for item in value:
            _feed(h, item)
    elif isinstance(value, Mapping):
        h.update(b"{%d" % len(value))
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, np.ndarray) and value.dtype != object:
        _feed(h, torch.from_numpy(np.ascontiguousarray(value)))
    else:
        text = value.hex() if isinstance(value, bytes) else repr(value)
        h.update(f"{type(value).__name__}:{len(text)}:{text}".encode())


@functools.lru_cache(maxsize=256)
def _header(dtype: torch.dtype, shape: torch.Size) -> bytes:
    """What precedes a tensor's bytes (its dtype and shape), so neighbouring examples cannot run together."""
    return f"T{dtype}{tuple(shape)}".encode()


def fingerprint(dataset: Any) -> Dict[str, Any]:
    """Length and an order-sensitive hash of every example (streamed; tensors hashed as their raw bytes).

    Each leaf is hashed with its type and shape, so neighbouring examples cannot run into each other. The
    resumable work folders are named by this hash too.
    """
    n = len(dataset)
    h = hashlib.sha256()
    for i in range(n):
        _feed(h, dataset[i])
    return {"n": n, "sha256": h.hexdigest(), "scheme": FINGERPRINT_SCHEME}


def check_fingerprint(expected: Mapping[str, Any], dataset: Any, what: str) -> Dict[str, Any]:
    """Refuse ``dataset`` unless it is, example for example and in order, the one ``expected`` was taken on;
    returns its fingerprint (so that the data is read once)."""
    if expected.get("scheme") != FINGERPRINT_SCHEME:
        raise MSIFError(
            f"The snapshot's fingerprint of the {what} was taken by an older lightning-msif on a sample of the "
            "examples only, which cannot vouch for the data: re-run the pretraining stage with this version."
        )
    got = fingerprint(dataset)
    if int(expected["n"]) != got["n"] or str(expected["sha256"]) != got["sha256"]:
        raise MSIFError(
            f"The {what} differs from the one the pretraining snapshot was taken on (snapshot: "
            f"{expected['n']} examples, hash {str(expected['sha256'])[:12]}; now: {got['n']} examples, hash "
            f"{got['sha256'][:12]}): an example, a label or the order changed. Scores would not index the "
            "pretraining set: pass the same data (same order, same preprocessing) or take a new pretraining "
            "snapshot."
        )
    return got


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


# -- content hashes ----------------------------------------------------------------------------
HASH_KEY = "sha256"  # the metadata entry of a safetensors file, and the manifest field, that holds its content hash


def tensors_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 of a safetensors file's content: its metadata (but the hash) and every tensor's name, dtype, shape
    and bytes, in name order; so any changed byte that still parses changes it."""
    h = hashlib.sha256()
    _feed(h, [[(k, v) for k, v in sorted(metadata.items()) if k != HASH_KEY],
              [(k, tensors[k]) for k in sorted(tensors)]])
    return h.hexdigest()


def save_checked(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    """Atomic safetensors write with its content hash in the metadata; returns the hash."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    metadata[HASH_KEY] = tensors_hash(data, metadata)
    save_tensors(path, data, metadata=metadata)
    return metadata[HASH_KEY]


def load_checked(path: PathLike, fix: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and metadata of a file written by ``save_checked``, refused (naming the file and ``fix``) when it
    cannot be parsed or its content no longer matches its hash."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise MSIFError(f"{path} cannot be read ({err}): it is damaged. {fix}") from err
    if metadata.get(HASH_KEY) != tensors_hash(tensors, metadata):
        raise MSIFError(f"{path} does not match its content hash: it was changed or damaged after it was written "
                        f"(or written by an older lightning-msif). {fix}")
    return tensors, metadata


def fields_hash(manifest: DictConfig) -> str:
    """sha256 over a manifest's fields (but the hash itself), as plain JSON with sorted keys."""
    plain = OmegaConf.to_container(manifest, resolve=True)
    plain.pop(HASH_KEY, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def save_manifest(path: PathLike, fields: Mapping[str, Any]) -> DictConfig:
    """Write a YAML manifest with the hash of its fields; returns it as written."""
    manifest = OmegaConf.create(dict(fields))
    manifest[HASH_KEY] = fields_hash(manifest)
    save_text(path, OmegaConf.to_yaml(manifest))
    return manifest


def check_manifest(manifest: DictConfig, path: PathLike, fix: str) -> DictConfig:
    """``manifest`` (read from ``path``) if its fields still match their hash, else refused (e.g. an edited
    ``trainable`` list)."""
    if manifest.get(HASH_KEY) != fields_hash(manifest):
        raise MSIFError(f"{path} does not match the hash of its fields: it was edited (e.g. its trainable list) or "
                        f"damaged after it was written, or written by an older lightning-msif. {fix}")
    return manifest


def load_manifest(path: PathLike, fix: str) -> DictConfig:
    """A manifest written by ``save_manifest``, checked against its hash."""
    return check_manifest(read_yaml(path), path, fix)


# -- resumable partial results -----------------------------------------------------------------
class FileStore:
    """A ``ScoreStore`` backed by one safetensors file per key in a folder (atomic writes, content hashed)."""

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def keys(self) -> List[str]:
        """Every key held."""
        return [p.name[: -len(".safetensors")] for p in self.folder.glob("*.safetensors")]

    def get(self, key: str) -> Optional[torch.Tensor]:
        path = self.path(key)
        if not path.exists():
            return None
        fix = f"Delete {self.folder} (it holds partial results only) and run again."
        return load_checked(path, fix)[0]["t"]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        save_checked(self.path(key), {"t": tensor})

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
        tensors, meta = load_checked(path, f"Delete {path} (the curvature is fitted again) or re-run the pretraining "
                                           "stage.")
        if meta.get("weights_sha256") != self.weights_sha or meta.get("format_version") != str(FORMAT_VERSION):
            return None  # fitted on other weights (or by another version): refit
        return tensors, json.loads(meta["meta"])

    def put(self, key: str, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
        save_checked(self.folder / f"{key}.safetensors", tensors,
                     metadata={"meta": json.dumps(meta), "weights_sha256": self.weights_sha,
                               "format_version": str(FORMAT_VERSION)})


class IndexFiles:
    """An ``IndexStore``: one safetensors file per block of a gradient index, in one folder (atomic writes).

    ``hashes``: each block's content hash as recorded when the capture finished; a block that is not listed, or
    whose content changed, is refused.
    """

    FIX = "Capture the index again (PretrainingSnapshot(index_dim=...)), or delete that folder to score without it."

    def __init__(self, folder: PathLike, hashes: Optional[Mapping[str, str]] = None):
        self.folder, self.hashes = Path(folder), hashes

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str) -> torch.Tensor:
        tensors, meta = load_checked(self._path(key), self.FIX)
        if self.hashes is not None and self.hashes.get(key) != meta[HASH_KEY]:
            raise MSIFError(f"{self._path(key)} is not the block the index manifest records (another capture's "
                            f"file). {self.FIX}")
        return tensors["rows"]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        save_checked(self._path(key), {"rows": tensor})

    def recorded(self) -> Dict[str, str]:
        """Every block's content hash, read from the files' headers (what ``finish_index`` records)."""
        out = {}
        for path in sorted(self.folder.glob("rows.*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                out[path.name[: -len(".safetensors")]] = (fh.metadata() or {}).get(HASH_KEY, "")
        return out

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
        score-blocks/<id>/scores.<start>-<stop>.safetensors   a streamed matrix's row blocks (instead)
        report/                      CSV tables and report.html

    A manifest records the format version, library versions, the shared parameters' names and shapes,
    a hash of the weights, how to rebuild the module and the data (class path + hyperparameters), and
    a fingerprint of the training data, so a later stage can refuse a snapshot that does not fit; and a
    hash of its own fields. Every safetensors file but the weights carries its content hash.

    A stage folder is replaced whole (``write_stage``): the new one is written beside it as
    ``.<stage>.<writer>.new`` and renamed into place, so a reader, or a run killed at any point, finds the
    old complete stage or the new complete one.
    """

    WEIGHTS = "weights.safetensors"
    MANIFEST = "manifest.yaml"
    GRADIENTS = "gradients.safetensors"
    SCORES = "scores.safetensors"
    SCORES_RECORD = "scores.yaml"
    SCORE_BLOCKS = "score-blocks"

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
        """What a W&B artifact of the scores holds: the matrix (or its streamed blocks) and its record."""
        record = self.scores_record()
        if record is not None and record.get("layout") == "blocks":
            folder = self.root / self.SCORE_BLOCKS / str(record.blocks_folder)
            return [*sorted(folder.glob("scores.*.safetensors")), self.root / self.SCORES_RECORD]
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
        """Weights and manifest of ``module`` for ``stage``, swapped in as one folder; returns the manifest.

        What else the stage folder holds (stored gradients, fitted curvature, gradient index) belongs to its
        weights: it is kept when the weights are unchanged and dropped when they changed. Leftovers of a
        writer that died are cleaned first.
        """
        folder = self.root / stage
        self._settle()
        remove_stale(self.root)
        new = temp_path(folder, "new")
        new.mkdir(parents=True)
        try:
            manifest = self._write_new_stage(new, folder, stage, module, {
                "shared": shared,
                "shared_params": shared_shapes(module, shared),
                "trainable": [n for n, p in module.named_parameters() if p.requires_grad],
                "module": class_record(module),
                "data": class_record(data) if data is not None else None,
                "fingerprint": fingerprint(train_dataset) if train_dataset is not None else None,
                **(extra or {}),
            })
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        self._swap(folder, new)
        return manifest

    def _write_new_stage(self, new: Path, folder: Path, stage: str, module: nn.Module,
                         fields: Dict[str, Any]) -> DictConfig:
        """Weights, what of the old stage still fits them, then the manifest: from then on ``new`` is complete."""
        weights = new / self.WEIGHTS
        save_tensors(weights, dict(module.state_dict()), metadata={"format_version": str(FORMAT_VERSION)})
        sha = sha256_file(weights)
        if self._weights_sha(stage) == sha:
            _link_tree(folder, new, skip={self.MANIFEST, self.WEIGHTS})
        return save_manifest(new / self.MANIFEST, {
            "format_version": FORMAT_VERSION,
            "stage": stage,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "weights": {"file": weights.name, "sha256": sha},
            **fields,
        })

    def _weights_sha(self, stage: str) -> Optional[str]:
        """The weights hash of the stage now in place, or None when there is no intact one."""
        try:
            return str(self.manifest(stage).weights.sha256)
        except MSIFError:
            return None

    def _swap(self, folder: Path, new: Path) -> None:
        """Put the complete stage ``new`` in place of ``folder`` with two renames (``_settle`` finishes the
        second one if the writer dies between them), then remove the old one."""
        old = temp_path(folder, "old")
        if folder.exists():
            os.rename(folder, old)
        os.rename(new, folder)
        fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _settle(self) -> None:
        """Finish the swaps of writers that died between their two renames: a complete new stage goes in place."""
        done = sorted((p for p in self.root.glob(".*.new") if (p / self.MANIFEST).exists() and is_stale(p)),
                      key=lambda p: (p / self.MANIFEST).stat().st_mtime, reverse=True)  # newest first
        for new in done:
            target = self.root / temp_target(new)
            if not target.exists():
                try:
                    os.rename(new, target)
                except OSError:  # another process settled it first, or this one may not write here
                    pass

    def manifest(self, stage: str) -> DictConfig:
        """The stage's manifest, after checking it exists, is of this format version and is intact."""
        self._settle()
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
        check_manifest(manifest, path, "Re-run that stage to write a consistent snapshot.")
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
        path = self.root / "pretrain" / self.GRADIENTS
        save_checked(path, {"gradients": gradients}, metadata=meta)
        return path

    def read_gradients(self, weights_sha: str, names: Iterable[str]) -> Optional[torch.Tensor]:
        """Stored pretraining gradients if they were taken on these weights, in this parameter order; else None
        (refused when the file changed since it was written)."""
        path = self.root / "pretrain" / self.GRADIENTS
        if not path.exists():
            return None
        tensors, meta = load_checked(path, "Re-run the pretraining stage with store_gradients=True, or delete the "
                                           "file to score without it.")
        fits = (meta.get("projection") == "none" and meta.get("weights_sha256") == weights_sha
                and json.loads(meta.get("names", "[]")) == list(names))
        return tensors["gradients"] if fits else None

    # -- the gradient index of the pretraining set -------------------------------------------------------
    @property
    def index_dir(self) -> Path:
        return self.root / "pretrain" / "index"

    def open_index(self, spec: Dict[str, Any]) -> IndexFiles:
        """The index folder for a capture described by ``spec`` (projection, weights hash, data fingerprint,
        dtype, block): an index with another description is removed first; a matching one is kept (resume)."""
        spec = {"format_version": FORMAT_VERSION, **spec}
        try:
            current = self.index_spec()
        except MSIFError:  # edited, damaged or written by an older version: captured again
            current = None
        if current != spec:
            shutil.rmtree(self.index_dir, ignore_errors=True)
            save_manifest(self.index_dir / self.MANIFEST, {**spec, "complete": False})
        return IndexFiles(self.index_dir)

    def index_pieces(self) -> IndexFiles:
        """Rows caught during training, by block and rank, until they are assembled into the index."""
        return IndexFiles(self.root / "index-pieces")  # outside the stage folder: the end-of-fit snapshot keeps it

    def remove_index_pieces(self) -> None:
        """Remove rows caught during training that were not assembled (e.g. left by an interrupted run)."""
        shutil.rmtree(self.root / "index-pieces", ignore_errors=True)

    def remove_index(self) -> None:
        """Remove the gradient index (e.g. one left by an earlier pretraining run, of other weights)."""
        shutil.rmtree(self.index_dir, ignore_errors=True)

    def index_store(self) -> IndexFiles:
        """The blocks of the gradient index (``open_index`` first)."""
        return IndexFiles(self.index_dir)

    def finish_index(self, projection: Dict[str, Any], duals: Dict[str, torch.Tensor],
                     steps: Optional[Dict[str, Any]] = None) -> None:
        """Mark the index complete (every block written), with the projection it was taken with, the matrices
        that project vectors alike, every file's content hash and, for rows caught in training steps, how many
        were (``steps``)."""
        files = {"projection": save_checked(self.index_dir / "projection.safetensors", duals),
                 **IndexFiles(self.index_dir).recorded()}
        save_manifest(self.index_dir / self.MANIFEST, {**(self.index_spec() or {}), "projection": projection,
                                                       "steps": steps, "files": files, "complete": True})

    def _index_manifest(self) -> Optional[Dict[str, Any]]:
        path = self.index_dir / self.MANIFEST
        if not path.exists():
            return None
        return OmegaConf.to_container(load_manifest(path, IndexFiles.FIX), resolve=True)

    def index_spec(self) -> Optional[Dict[str, Any]]:
        """The description of the index in the folder (without what is written when the capture finishes), or
        None."""
        manifest = self._index_manifest()
        if manifest is None:
            return None
        return {k: v for k, v in manifest.items() if k not in ("complete", "projection", "steps", "files", HASH_KEY)}

    def read_index(self, weights_sha: str, data_fingerprint: Optional[Mapping[str, Any]]) -> Optional[GradientIndex]:
        """The complete gradient index taken on these pretraining weights and the data of ``data_fingerprint``
        (``fingerprint(dataset)``; None: not checked), or None when there is none; an error when the folder holds
        one that does not fit (other weights, other data, unfinished) or a file of it changed since the capture."""
        spec = self._index_manifest()
        if spec is None:
            return None
        complete = bool(spec.get("complete"))
        problems = []
        if spec.get("format_version") != FORMAT_VERSION:
            problems.append(f"format version {spec.get('format_version')} (this library reads {FORMAT_VERSION})")
        if spec.get("weights_sha256") != weights_sha:
            problems.append("other pretraining weights")
        if data_fingerprint is not None and spec.get("fingerprint") != dict(data_fingerprint):
            problems.append("other pretraining data")
        if not complete:
            problems.append("an unfinished capture")
        if problems:
            raise MSIFError(f"The gradient index in {self.index_dir} does not fit this run: {', '.join(problems)}. "
                            f"{IndexFiles.FIX}")
        files = dict(spec["files"])
        duals, meta = load_checked(self.index_dir / "projection.safetensors", IndexFiles.FIX)
        if meta[HASH_KEY] != files.pop("projection"):
            raise MSIFError(f"{self.index_dir / 'projection.safetensors'} is not the projection the index manifest "
                            f"records. {IndexFiles.FIX}")
        return GradientIndex(IndexFiles(self.index_dir, files), int(spec["n"]), spec["projection"], duals,
                             int(spec["block"]))

    # -- the score matrix ------------------------------------------------------------------------------
    def write_scores(self, scores: torch.Tensor, record: Dict[str, Any]) -> Path:
        """``scores.safetensors`` (``scores``, ``pretrain_indices``, ``query_indices``) and ``scores.yaml`` (the
        record, the matrix file's content hash and the hash of its own fields)."""
        text = OmegaConf.to_yaml(OmegaConf.create(record))
        n, k = scores.shape
        sha = save_checked(self.scores_path,
                           {"scores": scores, "pretrain_indices": torch.arange(n), "query_indices": torch.arange(k)},
                           metadata={"manifest": text, "format_version": str(FORMAT_VERSION)})
        save_manifest(self.root / self.SCORES_RECORD, {**record, "layout": "matrix", "shape": [n, k],
                                                       "scores_sha256": sha})
        self._drop_score_blocks(keep=None)
        return self.scores_path

    def write_score_blocks(self, store: FileStore, shape: Tuple[int, int], record: Dict[str, Any]) -> Path:
        """A streamed matrix: the row blocks a scoring run left in ``store`` (``scores.<start>-<stop>``), linked into
        ``score-blocks/<id>/`` and then named, with their hashes, by ``scores.yaml``. Until that record is
        replaced the previous scores stay whole; afterwards the previous files are removed."""
        n, k = shape
        spans = sorted(filter(None, map(block_span, store.keys())))
        if not _tiles(spans, n):
            raise MSIFError(f"The streamed scores in {store.folder} cover rows {spans[:3]}… of {n}: some blocks are "
                            "missing. Every rank writes its blocks under snapshot_dir, so with several nodes it must "
                            "be one shared filesystem (or set stream_scores=False to gather them). Score again: the "
                            "run resumes from the blocks it has.")
        folder = self.root / self.SCORE_BLOCKS / secrets.token_hex(8)
        remove_stale(self.root / self.SCORE_BLOCKS)
        new = temp_path(folder, "new")
        new.mkdir(parents=True)
        hashes = {}
        for start, stop in spans:
            source = store.path(block_name(start, stop))
            _link_or_copy(str(source), str(new / source.name))
            with safe_open(str(source), framework="pt") as fh:
                hashes[f"{start}-{stop}"] = (fh.metadata() or {})[HASH_KEY]
        os.rename(new, folder)
        fsync_dir(folder.parent)
        save_manifest(self.root / self.SCORES_RECORD, {**record, "layout": "blocks", "shape": [n, k],
                                                       "blocks_folder": folder.name, "blocks": hashes})
        self.scores_path.unlink(missing_ok=True)
        self._drop_score_blocks(keep=folder.name)
        return folder

    def _drop_score_blocks(self, keep: Optional[str]) -> None:
        """Remove the block folders no record names (those of earlier runs)."""
        parent = self.root / self.SCORE_BLOCKS
        for entry in parent.iterdir() if parent.is_dir() else ():
            if entry.name != keep and temp_target(entry) is None:
                shutil.rmtree(entry, ignore_errors=True)

    def scores_record(self) -> Optional[DictConfig]:
        """How the last scores were computed (``scores.yaml``), or None before any scoring run."""
        path = self.root / self.SCORES_RECORD
        return read_yaml(path) if path.exists() else None

    def score_matrix(self) -> Tuple[ScoreMatrix, DictConfig]:
        """The last scores, read block by block (a streamed matrix is never loaded whole), and their record."""
        path = self.root / self.SCORES_RECORD
        fix = "Score again (`msif score`, or the finetune stage) to write a consistent set."
        if not path.exists():
            raise MSIFError(
                f"No {self.SCORES_RECORD} in {self.root}: the finetune stage (or `msif score`) writes the scores "
                "after training."
            )
        record = load_manifest(path, fix)
        if record.get("layout") != "blocks":
            return DenseScores(self._read_matrix(record, fix)), record
        name = str(record.blocks_folder)
        if Path(name).name != name or name.startswith("."):
            raise MSIFError(f"{path} names the block folder {name!r}, which is not a plain folder name. {fix}")
        return ScoreFiles(self.root / self.SCORE_BLOCKS / name, record, fix), record

    def _read_matrix(self, record: DictConfig, fix: str) -> torch.Tensor:
        if not self.scores_path.exists():
            raise MSIFError(f"No {self.SCORES} in {self.root}, which {self.SCORES_RECORD} describes. {fix}")
        tensors, meta = load_checked(self.scores_path, fix)
        if meta[HASH_KEY] != record.get("scores_sha256"):
            raise MSIFError(f"{self.scores_path} is not the matrix {self.SCORES_RECORD} describes (a file from "
                            f"another run). {fix}")
        return tensors["scores"]

    def read_scores(self) -> Tuple[torch.Tensor, DictConfig]:
        """The whole score matrix and its record, checked against their hashes (streamed blocks are joined: for
        a matrix too large to hold, read ``score_matrix()`` block by block instead)."""
        matrix, record = self.score_matrix()
        if isinstance(matrix, DenseScores):
            return matrix.scores, record
        return torch.cat([rows for _, rows in matrix.blocks()]), record


def _tiles(spans: List[Tuple[int, int]], n: int) -> bool:
    """Whether the sorted ``(start, stop)`` spans cover ``0 … n − 1`` exactly, each once."""
    stops = [stop for _, stop in spans]
    return bool(spans) and [start for start, _ in spans] == [0, *stops[:-1]] and stops[-1] == n


class ScoreFiles:
    """A streamed score matrix on disk (``ScoreMatrix``): its row blocks, each checked against the hash the
    record gives it when it is read."""

    def __init__(self, folder: Path, record: DictConfig, fix: str):
        self.folder, self.fix = folder, fix
        self.n, self.k = (int(v) for v in record.shape)
        self.hashes = {tuple(int(v) for v in span.split("-")): str(sha) for span, sha in record.blocks.items()}
        self.spans = sorted(self.hashes)
        if not _tiles(self.spans, self.n):
            raise MSIFError(f"The score blocks recorded for {folder} do not cover rows 0 to {self.n - 1}. {fix}")

    def blocks(self) -> Iterator[Tuple[int, torch.Tensor]]:
        for start, stop in self.spans:
            path = self.folder / f"{block_name(start, stop)}.safetensors"
            if not path.exists():
                raise MSIFError(f"The score block {path} is missing. {self.fix}")
            tensors, meta = load_checked(path, self.fix)
            rows = tensors["t"]
            if meta[HASH_KEY] != self.hashes[start, stop] or tuple(rows.shape) != (stop - start, self.k):
                raise MSIFError(f"{path} is not the block the score record describes (a file from another run). "
                                f"{self.fix}")
            yield start, rows


def _link_tree(src: Path, dst: Path, skip: Iterable[str]) -> None:
    """Hard-link (copy where links are not supported) every file under ``src`` into ``dst``, but the top-level
    names in ``skip`` and temporary files; ``src`` stays intact."""
    skipped = set(skip)
    for entry in src.iterdir() if src.is_dir() else ():
        if entry.name in skipped or entry.name.endswith((".tmp", ".new", ".old")):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("*.tmp"))
        else:
            _link_or_copy(str(entry), str(dst / entry.name))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
