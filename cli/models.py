"""Model-package commands: ``keygen``, ``sign PACKAGE_DIR`` and ``models list`` / ``models rollback VERSION``.

The registry logic (what a row shows, the rollback checks and steps) is ``training.models_cli``'s; these are
its front ends. Refusals are ``UserError``s (one line, exit 2); a rollback that fails after its checks is a
``SentimentError`` with exit 1 that says whether anything changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.common import DIRECTORY, load_settings
from runtime.errors import UserError

NEW_FILE = click.Path(dir_okay=False, path_type=Path)
KEY_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command(short_help="Write a new Ed25519 key pair for signing model packages.")
@click.option("--private", "private_key", type=NEW_FILE, required=True, metavar="PATH",
              help="Private key PEM to create (mode 0600); keep it with the trainer only.")
@click.option("--public", "public_key", type=NEW_FILE, required=True, metavar="PATH",
              help="Public key PEM to create; give it to the workers.")
def keygen(private_key: Path, public_key: Path) -> int:
    """Write a new Ed25519 key pair: the trainer signs with the private key, workers verify with the public one.

    Refuses to overwrite an existing file.
    """
    from runtime.signing import generate_keypair

    for path in (private_key, public_key):
        if path.exists():
            raise UserError(f"{path} exists; refusing to overwrite it")
    generate_keypair(private_key, public_key)
    print(json.dumps({"private": str(private_key), "public": str(public_key)}), file=sys.stderr)
    return 0


@click.command(short_help="Verify a model package's hashes, then sign its manifest.")
@click.argument("package", type=DIRECTORY, metavar="PACKAGE_DIR")
@click.option("--key", type=KEY_FILE, required=True, metavar="PRIVATE_PEM",
              help="Ed25519 private key PEM (from `sentiment keygen`).")
def sign(package: Path, key: Path) -> int:
    """Check every file of PACKAGE_DIR (a package, or a registry model directory with CURRENT) against its
    manifest.json, then write manifest.sig (an Ed25519 signature of the manifest's bytes).

    Prints the package, its version and the model's sha256 as JSON.
    """
    from runtime.package import MANIFEST_FILE, PackageError, resolve_package_dir, verify_package
    from runtime.signing import SIGNATURE_FILE, load_private_key, sign_manifest
    from schemas import ModelManifest

    package_dir = resolve_package_dir(package)
    try:
        private = load_private_key(key)  # SignatureError (a UserError) for a key of another kind
    except ValueError as exc:
        raise UserError(f"{key}: unreadable private key: {' '.join(str(exc).split())}") from exc
    # Sign the bytes that were verified, not a second read of the file: nothing can change in between.
    manifest_path = package_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise PackageError(f"{package_dir}: no {MANIFEST_FILE}")
    manifest_bytes = manifest_path.read_bytes()
    manifest = verify_package(package_dir)
    if ModelManifest.model_validate_json(manifest_bytes) != manifest:
        raise PackageError(f"{package_dir}: {MANIFEST_FILE} changed while it was verified")
    (package_dir / SIGNATURE_FILE).write_text(sign_manifest(manifest_bytes, private), encoding="ascii")
    print(json.dumps({"package": str(package_dir), "version": manifest.version,
                      "model_sha256": manifest.files["model.onnx"]}))
    return 0


@click.group(short_help="Registry versions and gate decisions; roll CURRENT back.")
def models() -> None:
    """What the model registry holds, and rolling CURRENT back to a published version.

    Both work on <registry>/<name>/: --registry / --name, default SENTIMENT_REGISTRY_DIR / SENTIMENT_MODEL_NAME.
    """


registry_option = click.option("--registry", type=DIRECTORY, default=None, metavar="DIR",
                               help="Registry root (default: SENTIMENT_REGISTRY_DIR).")
name_option = click.option("--name", default=None, help="Model name in the registry (default: SENTIMENT_MODEL_NAME).")


def models_settings(registry: Path | None, name: str | None):
    from training.models_cli import ModelsSettings

    return load_settings(ModelsSettings, registry_dir=registry, model_name=name)


@models.command("list", short_help="Registry versions, CURRENT, signatures, decisions.")
@registry_option
@name_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version instead of text.")
def list_models(registry: Path | None, name: str | None, as_json: bool) -> int:
    """One line per published version, oldest first; * marks CURRENT.

    Each line: the version, model.onnx's sha256 (12 characters), whether manifest.sig is present, created_at,
    and the decision that promoted it (request id, reason, holdout and feedback scores), if any.
    """
    from training.models_cli import (
        format_row,
        model_root,
        promoting_decisions,
        registry_versions,
        version_row,
    )

    settings = models_settings(registry, name)
    root = model_root(settings)
    versions, current = registry_versions(settings)
    decisions = promoting_decisions(settings)
    width = max(map(len, versions), default=0)
    for version in versions:
        row = version_row(root, version, current, decisions.get(version))
        print(json.dumps(row) if as_json else format_row(row, width))
    if current is not None and current not in versions:
        print(f"warning: CURRENT names {current!r}, which is not a published version", file=sys.stderr)
    return 0


@models.command(short_help="Make a published version CURRENT and announce it.")
@click.argument("version")
@registry_option
@name_option
@click.option("--reason", default="manual", show_default=True, metavar="TEXT",
              help="Why; recorded as 'rollback: TEXT' in decisions.jsonl.")
def rollback(version: str, registry: Path | None, name: str | None, reason: str) -> int:
    """Make VERSION (a published version, see `sentiment models list`) CURRENT again.

    Verifies VERSION, then journals, points CURRENT, sends the ModelUpdate (acks=all) and records the decision;
    the trainer's recovery finishes it after a crash. Never re-signs; honours SENTIMENT_VERIFY_KEY.
    """
    from training.models_cli import rollback_to

    decision, manifest, current = rollback_to(models_settings(registry, name), version, reason)
    print(json.dumps({"version": version, "previous_version": current, "request_id": decision.request_id,
                      "sha256": manifest.files["model.onnx"], "path": decision.path}))
    return 0
