"""Which classes a snapshot's records may rebuild: nothing a snapshot names is imported unless it is trusted.

A manifest's module/datamodule record is a class path and keyword arguments; rebuilding it imports that
path and calls it, so a snapshot folder from someone else could name ``subprocess.Popen``. A record is
rebuilt only when the snapshot is trusted, decided from the class path alone, *before* any import:

- it was written here by this user: ``class_record`` signs each record with an HMAC under a per-user
  secret key (``~/.config/lightning-msif/snapshot.key``, or the file ``$MSIF_KEY_FILE`` names), and
  the signature is checked on read (another user's or machine's key, or an edited record, fails);
- or its class path is allow-listed (``trusted_classes=[...]`` or ``$MSIF_TRUSTED_CLASSES``, comma-separated);
- or the user passed ``trust_records=True``.

Then the class must be a ``LightningModule`` (module record) or ``LightningDataModule`` (datamodule record)
subclass before it is called: a trusted record naming ``os.system`` is still refused.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import os
import secrets
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, Mapping, Optional, Union

from .errors import MSIFError

KEY_ENV = "MSIF_KEY_FILE"
CLASSES_ENV = "MSIF_TRUSTED_CLASSES"
BASES = {"module": "LightningModule", "datamodule": "LightningDataModule"}
TRUST_RECORDS_HELP = "rebuild records written elsewhere too: only for snapshots you trust (records name code)"
TRUSTED_CLASSES_HELP = "class paths the snapshots' records may rebuild wherever written, e.g. [my_pkg.models.Net]"
_KEY_BYTES = 32


# -- the per-user key ----------------------------------------------------------------------------------
def key_file() -> Path:
    """Where this user's snapshot key lives: ``$MSIF_KEY_FILE``, else under the user's config folder."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "lightning-msif" / "snapshot.key"


def _read_key(path: Path) -> Union[bytes, str]:
    """The key in ``path``, or why there is no usable one (missing, shared with other users, malformed)."""
    try:
        stat = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return f"this user has no snapshot key ({path} does not exist)"
    except (OSError, UnicodeDecodeError) as err:
        return f"this user's snapshot key {path} cannot be read ({err})"
    if hasattr(os, "getuid") and (stat.st_uid != os.getuid() or stat.st_mode & 0o077):
        return f"the snapshot key {path} is not private to this user (chmod 600 it, owned by you)"
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    return key if len(key) == _KEY_BYTES else f"the snapshot key {path} is malformed (delete it to make a new one)"


def _create_key(path: Path) -> None:
    """A new random key at ``path``, mode 0600; if another process creates one first, that one is kept."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".snapshot-key.", dir=path.parent)  # mkstemp: mode 0600
    try:
        os.write(fd, secrets.token_hex(_KEY_BYTES).encode("ascii"))
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)  # atomic and never overwrites: concurrent writers agree on one key
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def _digest(key: bytes, record: Mapping[str, Any]) -> str:
    payload = json.dumps({"class_path": record["class_path"], "hparams": record["hparams"]}, sort_keys=True,
                         separators=(",", ":"), default=repr)  # repr: values YAML holds beyond JSON (paths)
    return hmac.new(key, b"lightning-msif record\n" + payload.encode("utf-8"), hashlib.sha256).hexdigest()


def sign(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with its ``signature`` under this user's key (made on first use); unsigned, with a warning,
    when no key can be made (a read-only home): rebuilding it later needs an opt-in."""
    path = key_file()
    key = _read_key(path)
    if isinstance(key, str) and not path.exists():
        try:
            _create_key(path)
        except OSError as err:
            key = f"cannot create {path} ({err})"
        else:
            key = _read_key(path)
    if isinstance(key, str):
        warnings.warn(f"lightning-msif: the snapshot's records are not signed: {key}. Rebuilding from this snapshot "
                      f"will need trust_records=True or trusted_classes; set {KEY_ENV} to a writable file to sign.")
        return record
    return {**record, "signature": _digest(key, record)}


def _unsigned_why(record: Mapping[str, Any]) -> Optional[str]:
    """None when ``record`` carries a valid signature under this user's key, else why not."""
    signature = record.get("signature")
    if not isinstance(signature, str):
        return "its record is not signed (written by an older lightning-msif, or edited)"
    key = _read_key(key_file())
    if isinstance(key, str):
        return f"it was not written by this user on this machine: {key}"
    if not hmac.compare_digest(signature, _digest(key, record)):
        return (f"its signature does not match this user's key {key_file()} (written by another user or machine, "
                "or the record was edited)")
    return None


# -- the policy ------------------------------------------------------------------------------------------
def _is_class_path(path: Any) -> bool:
    """``package.module.Class``: dotted identifiers, nothing else (checked before anything is looked up)."""
    return isinstance(path, str) and "." in path and all(part.isidentifier() for part in path.split("."))


def _class_paths(values: Iterable[Any], source: str) -> FrozenSet[str]:
    """Dotted class paths, each checked; ``source`` names where they came from."""
    paths = frozenset(str(v).strip() for v in values if str(v).strip())
    for path in paths:
        if not _is_class_path(path):
            raise MSIFError(f"{source} holds {path!r}, which is not a class path: write package.module.Class.")
    return paths


@dataclass(frozen=True)
class Trust:
    """What a snapshot's records may rebuild beyond those signed by this user: every record (``records``),
    or the listed class paths (``classes``, plus ``$MSIF_TRUSTED_CLASSES`` read when a record is checked)."""

    records: bool = False
    classes: FrozenSet[str] = frozenset()

    @classmethod
    def of(cls, trust_records: bool = False, trusted_classes: Union[str, Iterable[str], None] = ()) -> "Trust":
        """The policy of the ``trust_records`` / ``trusted_classes`` options, checked (before any work)."""
        if not isinstance(trust_records, bool):
            raise MSIFError(f"trust_records={trust_records!r}: must be True or False.")
        given = [trusted_classes] if isinstance(trusted_classes, str) else list(trusted_classes or ())
        return cls(trust_records, _class_paths(given, "trusted_classes"))

    def allowed(self) -> FrozenSet[str]:
        """The allow-list: the option's class paths and the environment variable's."""
        return self.classes | _class_paths(os.environ.get(CLASSES_ENV, "").split(","), f"${CLASSES_ENV}")

    def check(self, record: Mapping[str, Any], what: str, hint: str) -> None:
        """Refuse ``record`` unless trusted; never imports anything. ``hint``: how to pass it explicitly."""
        path = record.get("class_path")
        if not _is_class_path(path):
            raise MSIFError(f"The {what} record in the snapshot names {path!r}, which is not a class path. Pass the "
                            f"{what} explicitly ({hint}).")
        why = None if self.records or path in self.allowed() else _unsigned_why(record)
        if why is not None:
            raise MSIFError(
                f"The snapshot's {what} record names {path!r}, which was not imported: {why}. A snapshot from "
                f"elsewhere could name any code. Pass the {what} explicitly ({hint}); or, if you trust this "
                f"snapshot, pass trust_records=True (msif: trust_records=true), or allow the class with "
                f"trusted_classes=[{path!r}] (msif: trusted_classes=[{path}], or ${CLASSES_ENV}={path}).")


def load_class(record: Mapping[str, Any], kind: str, what: str, trust: Trust, hint: str) -> type:
    """The class a trusted ``record`` names, imported only after the trust check and refused unless it is a
    Lightning ``kind`` (``module`` / ``datamodule``) class."""
    trust.check(record, what, hint)
    import lightning.pytorch as pl

    path = str(record["class_path"])
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise MSIFError(
            f"Cannot rebuild the {what} from the snapshot: {path!r} is not importable here ({err}). Make "
            f"its module importable (install it or add it to PYTHONPATH), or pass the {what} explicitly ({hint})."
        ) from err
    base = getattr(pl, BASES[kind])
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise MSIFError(f"The snapshot's {what} record names {path!r}, which is not a {BASES[kind]} subclass: it was "
                        f"not called. Pass the {what} explicitly ({hint}).")
    return cls
