"""Assemble a model package and publish it, to a plain directory or to a versioned registry.

Contract:
  * ``assemble_package`` writes ``model.onnx`` (INT8), ``tokenizer.json``, report files and
    ``manifest.json`` into a fresh staging directory and checks it with ``runtime.package.verify_package``.
  * ``publish_version`` moves a staged package to ``<registry>/<name>/<version>/`` whole or not at all: it
    goes to a hidden ``.staging-<version>/`` beside it, is fsynced, then renamed (atomic). A crash leaves
    either no version directory (maybe a staging leftover, which ``discard_staging`` removes and
    ``list_versions`` never lists) or a complete one. ``point_current`` then points
    ``<registry>/<name>/CURRENT`` at it (tmp + fsync + rename + directory fsync: atomic and durable).
    ``publish_to_registry`` is the two in that order; ``publish_to_dir`` replaces a plain ``--out``
    directory. Nothing is published unless the package verifies.
  * ``new_version`` is a UTC timestamp (``YYYYMMDD-HHMMSS``), so versions sort by time.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from runtime.package import CURRENT_POINTER, verify_package, write_manifest
from schemas import ModelManifest

STAGING_PREFIX = ".staging-"


def new_version(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")


def assemble_package(staging: Path, model_onnx: Path, tokenizer_json: Path, manifest: ModelManifest) -> ModelManifest:
    """Copies the model and tokenizer into ``staging`` (extra files may already be there) and writes the manifest."""
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_onnx, staging / "model.onnx")
    shutil.copyfile(tokenizer_json, staging / "tokenizer.json")
    written = write_manifest(staging, manifest)
    verify_package(staging)
    return written


def publish_to_registry(staging: Path, registry: Path, name: str, version: str) -> Path:
    """``<registry>/<name>/<version>/`` + CURRENT; refuses to overwrite an existing version."""
    target = publish_version(staging, registry, name, version)
    point_current(registry / name, version)
    return target


def publish_version(staging: Path, registry: Path, name: str, version: str) -> Path:
    """Moves ``staging`` to ``<registry>/<name>/<version>/`` atomically and durably; CURRENT is not touched.

    Refuses to overwrite an existing version (versions are immutable)."""
    verify_package(staging)
    root = registry / name
    target = root / version
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are immutable")
    root.mkdir(parents=True, exist_ok=True)
    temp = root / f"{STAGING_PREFIX}{version}"
    if temp.exists():  # a leftover of a crash mid-publish
        shutil.rmtree(temp)
    shutil.move(str(staging), str(temp))  # a rename on the same filesystem, else a copy
    _fsync_tree(temp)
    os.rename(temp, target)  # the version appears whole, or not at all
    fsync_dir(root)
    return target


def discard_staging(model_root: Path) -> list[str]:
    """Removes ``.staging-*`` leftovers of publishes that a crash interrupted; returns their names."""
    leftovers = sorted(p for p in model_root.glob(f"{STAGING_PREFIX}*") if p.is_dir()) if model_root.exists() else []
    for path in leftovers:
        shutil.rmtree(path)
    if leftovers:
        fsync_dir(model_root)
    return [p.name for p in leftovers]


def point_current(model_root: Path, version: str) -> None:
    """Points ``<model_root>/CURRENT`` at ``version``: atomic (readers never see half a write) and durable."""
    write_atomic(model_root / CURRENT_POINTER, (version + "\n").encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data``: a temporary file beside it, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Makes a directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the directories that hold them
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def publish_to_dir(staging: Path, out_dir: Path) -> Path:
    """Replaces ``out_dir`` with the staged package (a plain package directory, e.g. ``models/sentiment-en``)."""
    verify_package(staging)
    if out_dir.exists():
        if not (out_dir / "manifest.json").exists() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and is not a model package; refusing to replace it")
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(out_dir))
    return out_dir


def list_versions(registry: Path, name: str) -> list[str]:
    root = registry / name
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").exists()) if root.exists() \
        else []


def current_version(registry: Path, name: str) -> str | None:
    pointer = registry / name / CURRENT_POINTER
    return pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None
