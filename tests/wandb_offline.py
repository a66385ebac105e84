"""Read what an offline W&B run wrote: its tables, media files, summary and staged artifacts."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Iterator[Path]:
    """W&B offline, every directory it writes under the test's tmp dir."""
    root = tmp_path / "wandb_root"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (root / var.lower()).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(root / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.finish()  # no run left open by an earlier test may swallow this test's logging
    yield root
    wandb.finish()


def run_dir(root: Path) -> Path:
    runs = sorted(root.rglob("offline-run-*"))
    assert runs, f"no offline run under {root}"
    return runs[-1]


def tables(run: Path) -> Dict[str, dict]:
    """``{table file stem: parsed json}`` of every logged table."""
    return {p.name.split("_")[0] + "/" + p.name: json.loads(p.read_text()) for p in (run / "files" / "media" / "table").rglob("*.table.json")}


def table(run: Path, key: str) -> dict:
    """The table logged under ``key`` (e.g. ``msif/top_k``)."""
    folder = run / "files" / "media" / "table" / key.split("/")[0]
    found = sorted(folder.glob(f"{key.split('/')[-1]}_*.table.json"))
    assert found, f"no table {key} in {run}: {[p.name for p in (run / 'files' / 'media').rglob('*')]}"
    return json.loads(found[-1].read_text())


def media(run: Path, kind: str) -> List[Path]:
    return sorted((run / "files" / "media" / kind).rglob("*.*"))


def records(run: Path, wait: float = 60.0) -> List[Any]:
    """The protobuf records of an offline run's ``run-*.wandb`` file, once W&B has written them all.

    ``run.finish()`` can return before W&B's service process has flushed the file (it closes it when it tears the
    run's stream down), so the file is read again until its last record, ``exit``, is there.
    """
    deadline = time.monotonic() + wait
    while True:
        out = _parse(next(run.glob("run-*.wandb")).read_bytes())
        kinds = [rec.WhichOneof("record_type") for rec in out]
        if "exit" in kinds:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"{run} has no exit record after {wait:.0f} s: W&B did not finish writing it "
                                 f"(records so far: {kinds})")
        time.sleep(0.1)


def _parse(raw: bytes) -> List[Any]:
    """The complete records of a ``.wandb`` file (a 7-byte header, then LevelDB's log format in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if (kind == 0 and length == 0) or pos + 7 + length > len(raw):  # the end, or a record still being written
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def summary(run: Path) -> Dict[str, Any]:
    """The run summary as W&B forms it: each key's last logged value, unless the summary set it later (read from
    the history records themselves, not only from the summary records W&B derives from them)."""
    out: Dict[str, Any] = {}
    for rec in records(run):
        kind = rec.WhichOneof("record_type")
        items = rec.summary.update if kind == "summary" else rec.history.item if kind == "history" else ()
        for item in items:
            out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def artifacts(run: Path) -> List[Any]:
    """Artifact records logged by the run (name, type, manifest entries)."""
    return [rec.artifact for rec in records(run) if rec.WhichOneof("record_type") == "artifact"]
