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

Two model sets (``SENTIMENT_EXTRA_MODEL_DIR``): an update is routed by its package name. The default model's name
goes as above; the extra set's package name loads into ``pending_extra`` by the same steps, checked against the
extra model and inside the extra package's own root (``allowed_root_for``). Any other name is ignored.

``ModelUpdates`` is a mixin of ``StreamWorker``; it uses the host's ``settings``, ``labeler``, ``loader``,
``verify_key``, ``pending_classifier`` and ``pending_extra``.
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

    def _configured_sha256(self, extra: bool = False) -> str | None:
        """The model.onnx hash the configured package (or registry CURRENT) names now; None if unreadable."""
        path = self.settings.extra_model_dir if extra else self.settings.model_dir
        try:
            return read_manifest(resolve_package_dir(path)).files["model.onnx"]
        except (PackageError, KeyError) as exc:
            log.warning("configured_package_unreadable", path=str(path), error=repr(exc)[:300])
            return None

    async def _on_model_update(self, value: bytes | None) -> None:
        try:
            update = ModelUpdate.model_validate_json(value or b"")
        except ValueError as exc:
            log.warning("model_update_invalid", error=str(exc)[:300])
            return
        served = self.labeler.extra_classifier
        if update.model.name == self.labeler.classifier.ref.name:
            await self._load_if_changed(update.path, update.model.sha256, update.model.version)
        elif served is not None and update.model.name == served.ref.name:
            await self._load_if_changed(update.path, update.model.sha256, update.model.version, extra=True)

    async def _load_if_changed(self, path: str | Path, announced_sha256: str | None, version: str,
                               extra: bool = False) -> None:
        """Makes the package at ``path`` the next batch's model, unless it is what will run anyway.

        Compared with the *target* (the pending model if one is loaded, else the active one), so that a
        rollback to the active model cancels a pending swap instead of being ignored. Before anything is
        loaded, ``path`` must lie inside the registry root (``allowed_model_root``, symlinks resolved).
        Loading reads each served file once, checks its hash and (with ``verify_key``) the manifest's
        signature, and builds the session from those same bytes; the loaded package must then be this
        worker's model (``_check_compatible``) and hash to what the update announced. Any refusal keeps
        the current model serving, and is logged and counted by reason. ``extra``: the same for the extra model
        set (``labeler.extra_classifier``, ``pending_extra``).
        """
        served = self.labeler.extra_classifier if extra else self.labeler.classifier
        if served is None:
            return  # no extra set is served: nothing to update
        active = served.ref.sha256
        if announced_sha256 == active:
            if self._pending(extra) is not None:
                log.info("model_update_pending_dropped", version=version, reason="back to the active model")
                self._set_pending(extra, None)
            return
        if announced_sha256 is None:
            return  # nothing readable to compare with: keep what runs
        pending = self._pending(extra)
        if pending is not None and pending.ref.sha256 == announced_sha256:
            return
        loop = asyncio.get_running_loop()
        try:
            s = self.settings
            root = s.allowed_root_for(s.extra_model_dir or s.model_dir) if extra else None
            target = self._inside_registry(Path(path), root)
            # Load and verify (hashes, signature, session build) off the event loop and off the inference thread.
            # The served model's own class: a one-pass package reloads as one (its heads and aspect settings too).
            classifier = await loop.run_in_executor(self.loader, lambda: type(served).load(
                target, intra_op_threads=self.settings.intra_op_threads, public_key=self.verify_key))
            # What was loaded, not only what was asked for: a second CURRENT inside the root could point out.
            self._inside_registry(classifier.package_dir, root)
            self._check_compatible(classifier, served)
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
        self._set_pending(extra, classifier)
        log.info("model_update_loaded", version=classifier.ref.version, path=str(path), signed=classifier.signed,
                 model_set="extra" if extra else "default")

    def _pending(self, extra: bool) -> Classifier | None:
        return self.pending_extra if extra else self.pending_classifier

    def _set_pending(self, extra: bool, classifier: Classifier | None) -> None:
        if extra:
            self.pending_extra = classifier
        else:
            self.pending_classifier = classifier

    def _inside_registry(self, path: Path, root: Path | None = None) -> Path:
        root = root or self.settings.allowed_model_root
        resolved = resolve_package_dir(path.resolve()).resolve()
        if not resolved.is_relative_to(root):
            raise UpdateRefused(f"outside_registry: {resolved} is not under {root}")
        return resolved

    def _check_compatible(self, classifier: Classifier, current: Classifier | None = None) -> None:
        """The update must be the model this worker serves (``current``, default: the default set's): same name,
        task, labels and ONNX interface. A tagger package has other outputs, an ABSA package other labels: both
        once loaded 'successfully'."""
        served, new = (current or self.labeler.classifier).manifest, classifier.manifest
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
