"""Seed the shared model registry volume with the shipped model, signed (compose service ``registry-init``).

Runs once before the workers, the drift monitor and the trainer start (they depend on it finishing). If
``<registry>/<name>/CURRENT`` exists the registry is already live (maybe with versions the trainer promoted
since) and nothing is touched. Otherwise the image's shipped package ``$SENTIMENT_MODELS_DIR/<name>`` is
copied to a staging directory, its hashes are verified, its manifest is signed with the trainer's private key
(``SENTIMENT_SIGNING_KEY``, a compose secret), and it is published as ``<registry>/<name>/<manifest
version>/`` + ``CURRENT`` by ``training.registry.publish_to_registry`` (atomic rename, fsync), the same code
the trainer promotes with. The workers verify it with the public key (``SENTIMENT_VERIFY_KEY``).

Settings (the same ``SENTIMENT_*`` variables the services read): ``SENTIMENT_MODELS_DIR`` (set by the image;
``runtime.paths`` reads it, as it does for every default model path), ``SENTIMENT_REGISTRY_DIR``,
``SENTIMENT_MODEL_NAME`` (default ``sentiment-en``), ``SENTIMENT_SIGNING_KEY``.
Prints one JSON line; exit 0 when the registry has a current version, 2 on a missing setting or package.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from runtime.package import CURRENT_POINTER, PackageError, verify_package
from runtime.paths import MODELS_DIR as models
from runtime.signing import load_private_key, sign_package
from training.registry import current_version, point_current, publish_to_registry


def main() -> int:
    try:
        registry = Path(os.environ["SENTIMENT_REGISTRY_DIR"])
        key_path = Path(os.environ["SENTIMENT_SIGNING_KEY"])
    except KeyError as exc:
        print(f"error: {exc.args[0]} is not set", file=sys.stderr)
        return 2
    name = os.environ.get("SENTIMENT_MODEL_NAME") or "sentiment-en"
    if (registry / name / CURRENT_POINTER).exists():
        print(json.dumps({"event": "registry_ready", "model": name, "current": current_version(registry, name),
                          "seeded": False}))
        return 0
    try:
        key = load_private_key(key_path)
        manifest = verify_package(models / name)
    except (OSError, ValueError, PackageError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    (registry / name).mkdir(parents=True, exist_ok=True)
    target = registry / name / manifest.version
    if target.exists():  # a seed that stopped between publishing the version and pointing CURRENT at it
        if verify_package(target) != manifest:
            print(f"error: {target} exists and is not {models / name}", file=sys.stderr)
            return 2
        point_current(registry / name, manifest.version)
    else:
        with tempfile.TemporaryDirectory(prefix=".seed-", dir=registry) as work:
            staging = Path(work) / manifest.version
            shutil.copytree(models / name, staging)
            if verify_package(staging) != manifest:
                print(f"error: {models / name} changed while it was copied", file=sys.stderr)
                return 2
            sign_package(staging, key)
            publish_to_registry(staging, registry, name, manifest.version)
    print(json.dumps({"event": "registry_ready", "model": name, "current": manifest.version, "seeded": True,
                      "path": str(target)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
