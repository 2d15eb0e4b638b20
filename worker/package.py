"""The model package on disk: write it (training) and load it with hash checks (worker).

Layout of a package directory::

    manifest.json     schemas.ModelManifest; ``files`` maps every other file to its sha256
    model.onnx        the INT8 ONNX graph
    tokenizer.json    a HF ``tokenizers`` fast tokenizer
    report.md, *.png  optional: evaluation report and plots (hashed too)

A registry is ``<root>/<name>/<version>/`` plus ``<root>/<name>/CURRENT`` holding the current version.
``resolve_package_dir`` accepts either a package directory or a registry model directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from schemas import ModelManifest

MANIFEST_FILE = "manifest.json"
CURRENT_POINTER = "CURRENT"


class PackageError(Exception):
    """The package is missing, malformed, or does not match its manifest. The worker refuses to serve it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_package_dir(path: str | Path) -> Path:
    """A package directory as is; a registry model directory through its CURRENT pointer."""
    path = Path(path)
    pointer = path / CURRENT_POINTER
    if not (path / MANIFEST_FILE).exists() and pointer.exists():
        return path / pointer.read_text(encoding="utf-8").strip()
    return path


def read_manifest(package_dir: Path) -> ModelManifest:
    manifest_path = package_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise PackageError(f"{package_dir}: no {MANIFEST_FILE}")
    try:
        return ModelManifest.model_validate_json(manifest_path.read_bytes())
    except ValueError as exc:
        raise PackageError(f"{manifest_path}: invalid manifest: {exc}") from exc


def verify_package(package_dir: str | Path) -> ModelManifest:
    """Reads the manifest and checks every listed file's sha256. Raises PackageError on any mismatch."""
    package_dir = resolve_package_dir(package_dir)
    manifest = read_manifest(package_dir)
    for relative, expected in manifest.files.items():
        # Manifest paths are relative to the package; refuse anything that escapes it.
        target = (package_dir / relative).resolve()
        if not target.is_relative_to(package_dir.resolve()):
            raise PackageError(f"{package_dir}: file {relative!r} points outside the package")
        if not target.is_file():
            raise PackageError(f"{package_dir}: missing file {relative}")
        actual = sha256_file(target)
        if actual != expected:
            raise PackageError(
                f"{package_dir}: sha256 mismatch for {relative} (manifest {expected[:12]}…, file {actual[:12]}…)"
            )
    return manifest


def write_manifest(package_dir: Path, manifest: ModelManifest) -> ModelManifest:
    """Hashes every file in the package (except the manifest) into ``manifest.files`` and writes it."""
    files = {
        str(path.relative_to(package_dir)): sha256_file(path)
        for path in sorted(package_dir.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    manifest = manifest.model_copy(update={"files": files})
    save_manifest(package_dir, manifest)
    return manifest


def save_manifest(package_dir: Path, manifest: ModelManifest) -> None:
    """Writes ``manifest`` as it is (no re-hashing: use it only for fields that describe, never for files)."""
    (package_dir / MANIFEST_FILE).write_text(
        json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def set_current(model_root: Path, version: str) -> None:
    """Points ``<model_root>/CURRENT`` at ``version`` atomically (rename), so readers never see half a write."""
    tmp = model_root / f".{CURRENT_POINTER}.tmp"
    tmp.write_text(version + "\n", encoding="utf-8")
    tmp.replace(model_root / CURRENT_POINTER)
