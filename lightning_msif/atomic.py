"""Atomic file writes and content hashes: the one place files are written, for every module.

A file is written to a temporary name in its own folder, flushed to disk and renamed over the target,
so a reader (or a run killed half-way) sees the old file or the new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """Run ``write(tmp_path)``, fsync, then rename over ``path``; returns ``path``."""
    path = Path(path)
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
    return path


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Atomic safetensors write (tensors copied to contiguous CPU memory, ties broken)."""
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def save_bytes(path: PathLike, data: bytes) -> Path:
    """Atomic binary write."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_text(path: PathLike, text: str) -> Path:
    """Atomic UTF-8 text write."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_yaml(path: PathLike, cfg: Any) -> Path:
    """Atomic YAML write of a dict (or anything ``OmegaConf.create`` takes)."""
    from omegaconf import OmegaConf

    return save_text(path, OmegaConf.to_yaml(OmegaConf.create(cfg)))


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
