"""Stage folders on disk, written so that a crash never leaves one that looks complete.

A run keeps, per stage:

    runs/<name>/<stage>/            the finished checkpoint: a Hugging Face folder + manifest.json
    runs/<name>/.<stage>.partial/   work in progress (its manifest says "running") and the
                                    trainer's in-stage checkpoints, checkpoint-<step>/
    runs/<name>/.<stage>.old/       only for the instant a finished folder is being replaced

A stage is built in `.partial` and renamed into place once its manifest says
"complete"; `recover` finishes or undoes a replacement that a crash cut short. Every
file that marks completeness (the manifest, an in-stage checkpoint's COMPLETE marker)
is written last, after everything it vouches for is flushed to disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CHECKPOINT_MARKER = "COMPLETE"
CHECKPOINT_PREFIX = "checkpoint-"


def final_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / stage


def partial_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / f".{stage}.partial"


def old_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / f".{stage}.old"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_build_id() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- durable writes


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` survive power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; renames are still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk before a marker says they are complete."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` so that readers see the old content or the new, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---------------------------------------------------------------- manifests


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none or it cannot be read."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_problem(folder: Path) -> str | None:
    """Why the folder's manifest exists but cannot be read (torn, edited, not JSON), or
    None: a missing manifest is no problem, just a folder this project did not finish."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{path} cannot be read: {str(e).splitlines()[0]}"
    return None if isinstance(manifest, dict) else f"{path} is not a JSON object"


def is_complete(folder: Path) -> bool:
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("status") == "complete"


# ---------------------------------------------------------------- promotion


def promote(run_dir: Path, stage: str) -> Path:
    """Move a complete `.partial` into place, replacing any older version of the stage."""
    partial, final, old = partial_dir(run_dir, stage), final_dir(run_dir, stage), old_dir(run_dir, stage)
    if not is_complete(partial):
        raise RuntimeError(f"{partial} is not complete; refusing to promote it")
    for child in partial.glob(f"{CHECKPOINT_PREFIX}*"):
        remove_tree(child)
    if old.exists():
        remove_tree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(partial, final)
    fsync_dir(run_dir)
    remove_tree(old)
    return final


def recover(run_dir: Path, stage: str) -> str | None:
    """Finish or undo a promotion that a crash interrupted. Returns what it did, if anything."""
    partial, final, old = partial_dir(run_dir, stage), final_dir(run_dir, stage), old_dir(run_dir, stage)
    if is_complete(partial):
        promote(run_dir, stage)
        return f"finished installing {stage} (a previous run stopped while moving it into place)"
    if old.exists():
        if final.exists():
            remove_tree(old)
            return None
        os.rename(old, final)
        fsync_dir(run_dir)
        return f"restored the previous {stage} (a previous run stopped while replacing it)"
    return None


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------- in-stage checkpoints


def mark_checkpoint_complete(checkpoint: Path) -> None:
    """Flush a trainer checkpoint and mark it usable for resuming."""
    fsync_tree(checkpoint)
    write_text_atomic(checkpoint / CHECKPOINT_MARKER, now() + "\n")


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest in-stage checkpoint whose writing finished, or None."""
    done = [
        p
        for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / CHECKPOINT_MARKER).exists()
    ]
    return max(done, key=checkpoint_step, default=None)


def discard_unfinished_checkpoints(folder: Path) -> list[str]:
    """Delete checkpoint folders a crash left half-written, so none is ever resumed from."""
    removed = []
    for p in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        if p.is_dir() and not (p / CHECKPOINT_MARKER).exists():
            remove_tree(p)
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------- content hashes


class HashCache:
    """sha256 of files and folders, remembered by (path, size, mtime) in the run folder,
    so that checking freshness does not reread gigabytes of weights every time."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, str] = {}
        self.dirty = False
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def __call__(self, path: Path) -> str:
        path = path.resolve()
        if path.is_dir():
            manifest = read_manifest(path)
            if manifest and manifest.get("status") == "complete" and manifest.get("fingerprint"):
                # Our own checkpoints are identified by what built them.
                return f"checkpoint:{manifest['fingerprint']}:{manifest.get('build_id')}"
            digest = hashlib.sha256()
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(child.relative_to(path)).encode() + b"\0")
                digest.update(self._file(child).encode())
            return "sha256:" + digest.hexdigest()
        return "sha256:" + self._file(path)

    def _file(self, path: Path) -> str:
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.entries:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self.entries[key] = digest.hexdigest()
            self.dirty = True
        return self.entries[key]

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.entries)
            self.dirty = False


def fingerprint_of(material: dict) -> str:
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
