"""Model updates: load a new package for the next batch, or refuse it and keep serving.

Contract: ``_load_if_changed(path, announced_sha256, version)`` makes the package at ``path`` the next batch's
model (``pending_classifier``; the agent swaps it in between batches), unless it is what will run anyway.
In this order, each step able to refuse:
  1. ``path`` must lie inside the registry root (``allowed_model_root``, symlinks resolved);
  2. the package is read once, each served file hashed and (with ``verify_key``) the manifest's signature
     checked, and the session is built from those same bytes (``Classifier.load``, off the event loop);
  3. the directory actually loaded must be inside the root too (a second CURRENT could point out);
  4. it must be this worker's model: name, task, labels and ONNX interface (``_check_compatible``);
  5. its model.onnx must hash to what the update announced.
A refusal keeps the current model serving; it is logged and counted by reason
(``sentiment_model_updates_refused_total{reason}``), never raised.

``ModelUpdates`` is a mixin of ``StreamWorker``; it uses the host's ``settings``, ``labeler``, ``loader``,
``verify_key`` and ``pending_classifier``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog

from runtime.errors import SentimentError
from runtime.inference import Classifier
from runtime.package import PackageError, read_manifest, resolve_package_dir
from runtime.signing import SignatureError
from schemas import ModelUpdate
from worker import metrics

log = structlog.get_logger(__name__)


class UpdateRefused(SentimentError):
    """A model update that must not be served: outside the registry, unsigned, or not this worker's model."""


class ModelUpdates:
    """The model-update half of ``StreamWorker`` (see the module docstring)."""

    def _configured_sha256(self) -> str | None:
        """The model.onnx hash the configured package (or registry CURRENT) names now; None if unreadable."""
        try:
            return read_manifest(resolve_package_dir(self.settings.model_dir)).files["model.onnx"]
        except (PackageError, KeyError) as exc:
            log.warning("configured_package_unreadable", path=str(self.settings.model_dir), error=repr(exc)[:300])
            return None

    async def _on_model_update(self, value: bytes | None) -> None:
        try:
            update = ModelUpdate.model_validate_json(value or b"")
        except ValueError as exc:
            log.warning("model_update_invalid", error=str(exc)[:300])
            return
        if update.model.name != self.labeler.classifier.ref.name:
            return
        await self._load_if_changed(update.path, update.model.sha256, update.model.version)

    async def _load_if_changed(self, path: str | Path, announced_sha256: str | None, version: str) -> None:
        """Makes the package at ``path`` the next batch's model, unless it is what will run anyway.

        Compared with the *target* (the pending model if one is loaded, else the active one), so that a
        rollback to the active model cancels a pending swap instead of being ignored. Before anything is
        loaded, ``path`` must lie inside the registry root (``allowed_model_root``, symlinks resolved).
        Loading reads each served file once, checks its hash and (with ``verify_key``) the manifest's
        signature, and builds the session from those same bytes; the loaded package must then be this
        worker's model (``_check_compatible``) and hash to what the update announced. Any refusal keeps
        the current model serving, and is logged and counted by reason.
        """
        active = self.labeler.classifier.ref.sha256
        if announced_sha256 == active:
            if self.pending_classifier is not None:
                log.info("model_update_pending_dropped", version=version, reason="back to the active model")
                self.pending_classifier = None
            return
        if announced_sha256 is None:
            return  # nothing readable to compare with: keep what runs
        pending = self.pending_classifier
        if pending is not None and pending.ref.sha256 == announced_sha256:
            return
        loop = asyncio.get_running_loop()
        try:
            target = self._inside_registry(Path(path))
            # Load and verify (hashes, signature, session build) off the event loop and off the inference thread.
            classifier = await loop.run_in_executor(self.loader, lambda: Classifier.load(
                target, intra_op_threads=self.settings.intra_op_threads, public_key=self.verify_key))
            # What was loaded, not only what was asked for: a second CURRENT inside the root could point out.
            self._inside_registry(classifier.package_dir)
            self._check_compatible(classifier)
            if classifier.ref.sha256 != announced_sha256:
                raise UpdateRefused(f"hash_mismatch: announced {announced_sha256[:12]}, loaded "
                                    f"{classifier.ref.sha256[:12]}")
        except Exception as exc:  # a bad package must never stop the worker
            reason = _refusal_reason(exc)
            metrics.MODEL_RELOADS.labels(result="refused").inc()
            metrics.MODEL_UPDATES_REFUSED.labels(reason=reason).inc()
            log.error("model_update_refused", path=str(path)[:300], version=version[:100], reason=reason,
                      error=repr(exc)[:300])
            return
        self.pending_classifier = classifier
        log.info("model_update_loaded", version=classifier.ref.version, path=str(path), signed=classifier.signed)

    def _inside_registry(self, path: Path) -> Path:
        root = self.settings.allowed_model_root
        resolved = resolve_package_dir(path.resolve()).resolve()
        if not resolved.is_relative_to(root):
            raise UpdateRefused(f"outside_registry: {resolved} is not under {root}")
        return resolved

    def _check_compatible(self, classifier: Classifier) -> None:
        """The update must be the model this worker serves: same name, task, labels and ONNX interface.
        A tagger package has other outputs, an ABSA package other labels: both once loaded 'successfully'."""
        served, new = self.labeler.classifier.manifest, classifier.manifest
        for field in ("name", "task", "labels", "onnx_output"):
            if getattr(new, field) != getattr(served, field):
                raise UpdateRefused(f"incompatible: {field} is {getattr(new, field)!r}, "
                                    f"the worker serves {getattr(served, field)!r}")
        if new.onnx_output not in classifier.output_names:
            raise UpdateRefused(f"incompatible: the graph has no output {new.onnx_output!r}")
        if not {"input_ids", "attention_mask"} <= classifier.input_names:
            raise UpdateRefused(f"incompatible: the graph's inputs are {sorted(classifier.input_names)}")


def _refusal_reason(exc: Exception) -> str:
    """The metric label for a refused update: a small fixed set, never the message."""
    if isinstance(exc, UpdateRefused):
        return str(exc).split(":", 1)[0]
    if isinstance(exc, SignatureError) or "manifest.sig" in str(exc):
        return "signature"
    if isinstance(exc, PackageError):
        return "package"
    return "load_failed"
