"""Kills stage snapshot writes at every point and at random moments; leaves each killed folder for the test.

``python integrity_job.py OUT``: writes ``OUT/base`` (a pretraining stage of weights A with stored gradients, a
fitted-curvature file and a gradient index), then for each scenario (``changed``: weights B are written;
``same``: weights A again) and each step k, a copy ``OUT/<scenario>-<k>`` in which a forked writer was
SIGKILLed just before its k-th file-system call (create, write, rename, link, remove); then ``OUT/random-<i>``,
each a copy in which a writer looping over A and B snapshots was SIGKILLed after a random delay. Prints the
number of steps of one write as JSON. Forks after one import, so the whole job takes a few seconds.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from lightning_msif.snapshots import SnapshotDir

CALLS = ("open", "mkdir", "rename", "replace", "link", "unlink", "rmdir")  # every call that changes the folder


def module(value: float) -> nn.Module:
    """A tiny shared backbone and head, every weight ``value`` (A = 1, B = 2)."""
    m = nn.ModuleDict({"backbone": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def base(root: Path) -> None:
    """Stage A with everything that lives beside its weights."""
    snapshots = SnapshotDir(root)
    manifest = snapshots.write_stage("pretrain", module(1.0), "backbone", train_dataset=[torch.ones(3)] * 4)
    sha = str(manifest.weights.sha256)
    snapshots.write_gradients(torch.ones(4, 26), [f"p{i}" for i in range(26)], sha)
    snapshots.factors(sha).put("ekfac-key", {"eig": torch.ones(3)}, {"blocks": []})
    snapshots.open_index({"dim": 2, "n": 4, "block": 2, "weights_sha256": sha}).put("rows.0-2", torch.ones(2, 3))
    snapshots.index_store().put("rows.2-4", torch.ones(2, 3))
    snapshots.finish_index({"kind": "random"}, {"dual": torch.ones(3)})


def fail_at(k: int) -> None:
    """Make this process SIGKILL itself just before its k-th file-system call."""
    count = [0]
    for name in CALLS:
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)

        setattr(os, name, wrapped)


def write(root: Path, value: float) -> None:
    SnapshotDir(root).write_stage("pretrain", module(value), "backbone", train_dataset=[torch.ones(3)] * 4)


def in_child(target, *args) -> int:
    """Run ``target(*args)`` in a forked child; its exit status (negative: killed by that signal)."""
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def every_step(out: Path, scenario: str, value: float) -> int:
    k = 1
    while True:
        run = out / f"{scenario}-{k}"
        shutil.copytree(out / "base", run)
        status = in_child(lambda: (fail_at(k), write(run, value)))
        if status == 0:  # the write finished before step k: every step has been cut
            shutil.rmtree(run)
            return k - 1
        if status != -signal.SIGKILL:
            raise RuntimeError(f"the writer failed at step {k} (exit status {status})")
        k += 1


def loop_forever(root: Path) -> None:
    value = 1.0
    while True:
        value = 3.0 - value
        write(root, value)


def random_kills(out: Path, times: int) -> None:
    rng = random.Random(0)
    for i in range(times):
        run = out / f"random-{i}"
        shutil.copytree(out / "base", run)
        pid = os.fork()
        if pid == 0:
            loop_forever(run)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    base(out / "base")
    steps = {scenario: every_step(out, scenario, value) for scenario, value in (("changed", 2.0), ("same", 1.0))}
    random_kills(out, int(sys.argv[2]) if len(sys.argv) > 2 else 8)
    print(json.dumps(steps))
