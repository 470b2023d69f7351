"""Crash-safe training checkpoints: atomic, verified, time-based, fingerprinted.

A checkpoint (``checkpoint-<step>``) holds what ``Trainer`` saves (adapter,
optimizer, scheduler, RNG states, trainer state with the data position) plus
the SO8T rotations. It is written into ``<root>/.staging`` and renamed into
place only once complete, with ``manifest.json`` (size and sha256 of every
file) written last. On resume the newest checkpoint whose manifest verifies
is used; an incomplete or corrupt one (missing file, wrong size, bad hash,
no manifest) is skipped with a warning.

``<root>/fingerprint.json`` ties checkpoints to one run: a hash per
ingredient (training params, dataset, base model). When any changed, the old
checkpoints are moved aside and training starts fresh, saying which changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from so8t.io import fsync_dir, fsync_tree, sha256_file, write_json

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
STAGING = ".staging"


def write_manifest(folder: Path) -> dict:
    """Write ``manifest.json`` listing every file's size (bytes) and sha256; returns it."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": "so8t-checkpoint-v1", "created": time.time(), "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify_checkpoint(folder: Path) -> str | None:
    """``None`` if ``folder`` is a complete checkpoint, else the reason it is not."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        return "no manifest (incomplete write)"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, meta in files.items():
        p = folder / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != meta["size"]:
            return f"{name}: size {p.stat().st_size} != {meta['size']} (truncated?)"
        if sha256_file(p) != meta["sha256"]:
            return f"{name}: sha256 mismatch (corrupt)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """``checkpoint-<step>`` folders under ``root``, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def latest_good_checkpoint(root: Path, warn=print) -> Path | None:
    """The newest checkpoint that verifies; bad ones are reported through ``warn``."""
    for ckpt in list_checkpoints(root):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        warn(f"skipping {ckpt}: {problem}")
    return None


def rotate(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` verified-complete checkpoints; returns what was removed."""
    removed = []
    good = [c for c in list_checkpoints(root) if (c / MANIFEST).is_file()]
    for old in good[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def publish(staged: Path, root: Path) -> Path:
    """Write the manifest, fsync, and atomically rename a staged checkpoint into ``root``."""
    write_manifest(staged)
    fsync_tree(staged)
    final = root / staged.name
    if final.exists():
        shutil.rmtree(final)
    os.replace(staged, final)
    fsync_dir(root)
    return final


def fingerprint(parts: dict[str, object]) -> dict[str, str]:
    """sha256 of each ingredient's canonical JSON."""
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest() for k, v in parts.items()
    }


def prepare_root(root: Path, current: dict[str, str], log=print) -> bool:
    """Make ``root`` ready for a run with fingerprint ``current``.

    Returns ``True`` when existing checkpoints belong to this run (resume is
    possible). A different fingerprint moves the old checkpoints to
    ``<root>.stale-<time>`` and logs which ingredients changed.
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / STAGING, ignore_errors=True)
    path = root / FINGERPRINT
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old == current:
            return True
        changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        if list_checkpoints(root):
            stale = root.with_name(f"{root.name}.stale-{int(time.time())}")
            os.replace(root, stale)
            root.mkdir(parents=True)
            log(f"checkpoints in {root} belong to a different run ({', '.join(changed)} changed): "
                f"moved to {stale}, starting fresh")
    write_json(path, current)
    return False


class TimeCheckpointCallback(TrainerCallback):
    """Ask the Trainer to save every ``minutes`` of wall time and at the last step."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60.0
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds > 0 and time.monotonic() - self.last >= self.seconds:
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


@dataclass
class SignalState:
    signum: int | None = None


class GracefulStopCallback(TrainerCallback):
    """SIGINT/SIGTERM: save a checkpoint after the current step and stop; a second signal exits at once."""

    def __init__(self) -> None:
        self.state = SignalState()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.state.signum is not None:
            sys.stderr.write(f"\nsecond signal {signal.Signals(signum).name}: exiting now without saving\n")
            os._exit(128 + signum)
        self.state.signum = signum
        sys.stderr.write(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
            "(send again to exit at once)\n"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.state.signum is not None:
            control.should_save = True
            control.should_training_stop = True

    @property
    def exit_code(self) -> int | None:
        return None if self.state.signum is None else 128 + self.state.signum
