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
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from runtime.errors import UserError
from runtime.signing import SIGNATURE_FILE, SignatureError, check_signature
from schemas import ModelManifest

MANIFEST_FILE = "manifest.json"
CURRENT_POINTER = "CURRENT"
# What the worker reads into memory to serve a package: hashed and loaded from the same bytes.
SERVED_FILES = ("model.onnx", "tokenizer.json")


class PackageError(UserError):
    """The package is missing, malformed, or does not match its manifest. The worker refuses to serve it."""


class PackageSignatureError(PackageError):
    """A verification key is configured and the package is unsigned or its signature does not verify."""


@dataclass(frozen=True)
class LoadedPackage:
    """A package read once into memory and verified: the worker builds its session from these bytes, so
    nothing can swap a file between the hash check and the load."""

    package_dir: Path
    manifest: ModelManifest
    files: dict[str, bytes]
    signed: bool


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
        target = _inside(package_dir, relative)
        if not target.is_file():
            raise PackageError(f"{package_dir}: missing file {relative}")
        _check_hash(package_dir, relative, expected, sha256_file(target))
    return manifest


def load_package(path: str | Path, public_key: Ed25519PublicKey | None = None) -> LoadedPackage:
    """Reads the manifest, its signature and the served files once, and verifies them in memory.

    Steps: read ``manifest.json`` bytes; with ``public_key``, check ``manifest.sig`` over exactly those bytes
    (``SignatureError``, a ``PackageError``); parse the manifest from the same bytes; read each served file
    and compare its sha256 with the manifest (``PackageError``). Other listed files (reports, plots) are
    checked on disk as ``verify_package`` does.
    """
    package_dir = resolve_package_dir(path)
    manifest_path = package_dir / MANIFEST_FILE
    try:
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise PackageError(f"{package_dir}: no {MANIFEST_FILE}") from exc
    signature_path = package_dir / SIGNATURE_FILE
    signed = False
    if public_key is not None:
        signature = signature_path.read_text(encoding="ascii", errors="replace") if signature_path.is_file() else None
        try:
            check_signature(manifest_bytes, signature, public_key)
        except SignatureError as exc:
            raise PackageSignatureError(f"{package_dir}: {exc}") from exc
        signed = True
    try:
        manifest = ModelManifest.model_validate_json(manifest_bytes)
    except ValueError as exc:
        raise PackageError(f"{manifest_path}: invalid manifest: {exc}") from exc
    files: dict[str, bytes] = {}
    for relative in SERVED_FILES:
        target = _inside(package_dir, relative)
        try:
            data = target.read_bytes()
        except OSError as exc:
            raise PackageError(f"{package_dir}: missing file {relative}") from exc
        _check_hash(package_dir, relative, manifest.files[relative], hashlib.sha256(data).hexdigest())
        files[relative] = data
    for relative, expected in manifest.files.items():
        if relative not in files:
            target = _inside(package_dir, relative)
            if not target.is_file():
                raise PackageError(f"{package_dir}: missing file {relative}")
            _check_hash(package_dir, relative, expected, sha256_file(target))
    return LoadedPackage(package_dir, manifest, files, signed)


def _inside(package_dir: Path, relative: str) -> Path:
    # Manifest paths are relative to the package; refuse anything that escapes it.
    target = (package_dir / relative).resolve()
    if not target.is_relative_to(package_dir.resolve()):
        raise PackageError(f"{package_dir}: file {relative!r} points outside the package")
    return target


def _check_hash(package_dir: Path, relative: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise PackageError(
            f"{package_dir}: sha256 mismatch for {relative} (manifest {expected[:12]}…, file {actual[:12]}…)"
        )


def write_manifest(package_dir: Path, manifest: ModelManifest) -> ModelManifest:
    """Hashes every file in the package (except the manifest) into ``manifest.files`` and writes it."""
    files = {
        str(path.relative_to(package_dir)): sha256_file(path)
        for path in sorted(package_dir.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST_FILE, SIGNATURE_FILE)
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
