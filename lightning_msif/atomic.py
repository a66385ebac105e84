"""Atomic file writes and content hashes: the one place files are written, for every module.

A file is written to a temporary name in its own folder, flushed to disk and renamed over the target,
so a reader (or a run killed half-way) sees the old file or the new one, never a torn one. Temporary
names carry their writer (host and process id), so the next writer can tell leftovers of a dead one
from files another live process is still writing (``remove_stale``). Files get the permissions
``open()`` would give them (``0o666`` less the umask), so shared folders stay readable by the group.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

STARTED = time.time()  # this writer's start: a temporary file of another host older than this is a leftover
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.)?[0-9a-z_]+\.(?:tmp|new|old)$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(target: PathLike, kind: str = "tmp") -> Path:
    """A fresh name beside ``target`` (``.<name>.<host>-<pid>.<random>.<kind>``) that names its writer."""
    target = Path(target)
    return target.parent / f".{target.name}.{_host()}-{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def temp_target(path: PathLike) -> Optional[str]:
    """The name of the file or folder a temporary one (``temp_path``) was written for, or None."""
    match = _TEMP.match(Path(path).name)
    return match["name"] if match else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (POSIX: signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(path: PathLike) -> bool:
    """A temporary file or folder left by a writer that is gone: a dead process of this host, or (another
    host's, an older version's name without a writer, or on Windows, where os.kill would end the process) one
    last touched before this writer started."""
    path = Path(path)
    match = _TEMP.match(path.name)
    if match is None:
        return False
    if match["host"] == _host() and os.name != "nt":
        return not _alive(int(match["pid"]))
    try:
        return path.lstat().st_mtime < STARTED
    except FileNotFoundError:  # its writer renamed it meanwhile
        return False


def remove_stale(folder: PathLike) -> List[Path]:
    """Remove the leftovers of dead writers in ``folder`` (and its subfolders); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if is_stale(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            removed += remove_stale(entry)
    return removed


def fsync_dir(folder: PathLike) -> None:
    """Make the renames inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """Run ``write(tmp_path)``, fsync, then rename over ``path``; returns ``path``.

    The temporary file is created as ``open()`` creates files (mode ``0o666`` less the umask, default ACLs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what open() gave it: 0o666 less the umask, or the folder's ACL
    try:
        write(str(tmp))
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file (safetensors: 0o600)
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Optional[Dict[str, str]] = None) -> Path:
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
