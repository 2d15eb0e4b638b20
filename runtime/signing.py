"""Package signatures: who may put a model in front of the workers.

A package's ``manifest.json`` lists the sha256 of every other file, so signing the manifest's exact bytes
signs the whole package. The signature is ``manifest.sig`` beside it: the base64 of an **Ed25519**
signature over those bytes. It is not listed in ``manifest.files`` (it cannot hash itself).

Why Ed25519 and not HMAC-SHA256: with HMAC the key that verifies is the key that signs, so every worker
host (and anyone who can read a worker's environment) could forge a package. With Ed25519 the workers
hold only the public key; the private key lives with the trainer alone. Keys are PEM files
(``sentiment keygen`` writes a pair).

Contract:
  * ``sign_manifest(manifest_bytes, private_key)`` → the signature file's content.
  * ``check_signature(manifest_bytes, signature_text, public_key)`` raises ``SignatureError`` unless the
    signature is a valid Ed25519 signature of exactly those bytes. Callers verify the bytes they then
    parse and load, never a second read of the file (a swap window).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.errors import UserError

SIGNATURE_FILE = "manifest.sig"


class SignatureError(UserError):
    """The package is unsigned, or its signature does not verify with the configured public key."""


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Writes a new Ed25519 key pair as PEM; the private key file is created readable by its owner only."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(private_pem)
    public_path.write_bytes(public_pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise SignatureError(f"{path}: unreadable public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(manifest_bytes)).decode("ascii") + "\n"


def sign_package(package_dir: Path, key: Ed25519PrivateKey) -> None:
    """Signs ``package_dir/manifest.json`` as it is on disk now; call it after the manifest's last write."""
    manifest_bytes = (package_dir / "manifest.json").read_bytes()
    (package_dir / SIGNATURE_FILE).write_text(sign_manifest(manifest_bytes, key), encoding="ascii")


def check_signature(manifest_bytes: bytes, signature_text: str | None, key: Ed25519PublicKey) -> None:
    if signature_text is None:
        raise SignatureError(f"the package has no {SIGNATURE_FILE}")
    try:
        signature = base64.b64decode(signature_text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{SIGNATURE_FILE} is not base64") from exc
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature as exc:
        raise SignatureError(f"{SIGNATURE_FILE} does not verify with the configured public key") from exc
