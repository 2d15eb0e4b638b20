"""Assemble a model package and publish it, to a plain directory or to a versioned registry.

Contract:
  * ``assemble_package`` writes ``model.onnx`` (INT8), ``tokenizer.json``, report files and
    ``manifest.json`` into a fresh staging directory and checks it with ``worker.package.verify_package``.
  * ``publish`` moves a staged package to ``<registry>/<name>/<version>/`` and points
    ``<registry>/<name>/CURRENT`` at it (atomic rename, ``worker.package.set_current``), or replaces a
    plain ``--out`` directory. Nothing is published unless the package verifies.
  * ``new_version`` is a UTC timestamp (``YYYYMMDD-HHMMSS``), so versions sort by time.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

from schemas import ModelManifest
from worker.package import CURRENT_POINTER, set_current, verify_package, write_manifest


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
    verify_package(staging)
    root = registry / name
    target = root / version
    if target.exists():
        raise FileExistsError(f"{target} already exists; versions are immutable")
    root.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(target))
    set_current(root, version)
    return target


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
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()) if root.exists() \
        else []


def current_version(registry: Path, name: str) -> str | None:
    pointer = registry / name / CURRENT_POINTER
    return pointer.read_text(encoding="utf-8").strip() if pointer.exists() else None
