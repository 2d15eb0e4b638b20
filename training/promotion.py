"""Promotion through a journal (steps P1-P7 of ``training.trainer``), its recovery, and rollback.

``promote`` signs, journals, publishes, points CURRENT, sends the ``ModelUpdate`` and records the decision, in
that order; ``finish_pending`` rolls a crashed promotion forward (or abandons one that never published);
``promote_published`` moves CURRENT to an already published version through the same journal (rollback).
The order and the invariants are stated in ``training.trainer``'s docstring.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.package import PackageError, verify_package
from runtime.settings import TrainerSettings
from schemas import ModelManifest, ModelRef, ModelUpdate, RetrainRequest
from training.job import Decision, decision_json, record_decision, recorded_decisions
from training.registry import discard_staging, fsync_dir, point_current, publish_version, write_atomic

if TYPE_CHECKING:  # the data module is imported by the job itself, not at service start
    pass

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- promotion


def _chaos(settings: TrainerSettings, step: str) -> None:
    """Chaos testing only (``SENTIMENT_TRAINER_CRASH_AT``): a kill -9 right after ``step``."""
    if settings.chaos_testing and settings.trainer_crash_at == step:
        log.warning("chaos testing: killing the trainer after promotion step %r", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


async def promote(settings: TrainerSettings, challenger: Path, decision: Decision, request: RetrainRequest,
                  producer) -> Decision:
    """Steps P1-P7 of the module docstring for a challenger that passed the gate; returns the decision as
    recorded (promoted, or not when publishing failed). Raises (and leaves the journal for recovery) when
    a step from P4 on fails."""
    from runtime.signing import load_private_key, sign_package

    root = settings.registry_dir / settings.model_name
    version = decision.challenger_version
    if not version:
        raise ValueError("a challenger to promote needs its version")
    root.mkdir(parents=True, exist_ok=True)
    try:
        if settings.signing_key is not None:  # P1
            sign_package(challenger, load_private_key(settings.signing_key))
        pending = write_journal(settings, decision, verify_package(challenger), request.request_id)  # P2
        await asyncio.get_running_loop().run_in_executor(  # P3
            None, publish_version, challenger, settings.registry_dir, settings.model_name, version)
    except Exception as exc:  # nothing is visible yet: abandon, record why
        log.exception("promotion of %s for request %s failed before CURRENT moved; abandoned", version,
                      request.request_id)
        _abandon(settings)
        decision.promoted, decision.path = False, None
        decision.reason = f"promotion failed: {exc!r}"[:500]
        record_decision(settings, decision)
        return decision
    _chaos(settings, "published")
    await _complete(settings, pending, producer, chaos=True)
    return decision


def write_journal(settings: TrainerSettings, decision: Decision, manifest: ModelManifest, request_id: str) -> dict:
    """P2: marks ``decision`` promoted (its path: ``<registry>/<name>/<version>``), builds the ``ModelUpdate``
    that announces ``manifest``'s model and writes the journal (``write_atomic``: whole or absent). Returns
    the journal's content, which is all that P4-P7 (``_complete``, or recovery after a crash) need."""
    version = decision.challenger_version
    if not version:
        raise ValueError("a challenger to promote needs its version")
    root = settings.registry_dir / settings.model_name
    decision.promoted, decision.path = True, str(root.resolve() / version)
    update = ModelUpdate(
        model=ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.files["model.onnx"],
                       quantization=manifest.quantization),
        path=decision.path, previous_version=decision.champion_version, request_id=request_id,
        metrics={k: v for k, v in decision.scores.items() if not np.isnan(v)},
    )
    pending = {"request_id": request_id, "version": version, "sha256": update.model.sha256,
               "key": manifest.name, "decision": decision_json(decision),
               "update": update.to_json_bytes().decode("utf-8")}
    write_atomic(settings.promotion_journal, json.dumps(pending).encode("utf-8"))
    return pending


async def promote_published(settings: TrainerSettings, decision: Decision, manifest: ModelManifest,
                            producer) -> Decision:
    """A rollback (``sentiment models rollback``): P2 and P4-P7 for a version that is already published
    (no P1: a rollback never re-signs; no P3: versions are immutable). ``decision.challenger_version`` names
    the version, ``decision.request_id`` is the journal's id. The same journal and the same ``_complete``
    as ``promote``, so an error from P4 on leaves the journal, and the trainer's start-up recovery (which
    finds the version published) rolls it forward. Raises on any error; returns the decision as recorded."""
    pending = write_journal(settings, decision, manifest, decision.request_id)  # P2
    await _complete(settings, pending, producer, chaos=False)  # P4-P7
    return decision


async def _complete(settings: TrainerSettings, pending: dict, producer, chaos: bool) -> None:
    """P4-P7, each idempotent: the normal path and recovery's roll-forward are this same code."""
    root = settings.registry_dir / settings.model_name
    point_current(root, pending["version"])  # P4
    if chaos:
        _chaos(settings, "current")
    await producer.send_and_wait(settings.model_updates_topic, value=pending["update"].encode("utf-8"),  # P5
                                 key=pending["key"].encode("utf-8"))
    if chaos:
        _chaos(settings, "sent")
    if not any(d["request_id"] == pending["request_id"] for d in recorded_decisions(settings)):
        record_decision(settings, pending["decision"])  # P6
    if chaos:
        _chaos(settings, "recorded")
    settings.promotion_journal.unlink(missing_ok=True)  # P7
    fsync_dir(root)


def _abandon(settings: TrainerSettings) -> None:
    root = settings.registry_dir / settings.model_name
    discard_staging(root)
    if settings.promotion_journal.exists():
        settings.promotion_journal.unlink()
        fsync_dir(root)


def read_pending(settings: TrainerSettings) -> dict | None:
    """The journal of an unfinished promotion, or None. It is written atomically, so it is never torn."""
    try:
        return json.loads(settings.promotion_journal.read_bytes())
    except FileNotFoundError:
        return None


async def finish_pending(settings: TrainerSettings, producer) -> str | None:
    """Recovery (module docstring): finishes or abandons an unfinished promotion. Returns what it did."""
    root = settings.registry_dir / settings.model_name
    pending = read_pending(settings)
    if pending is None:
        if leftovers := discard_staging(root):
            log.warning("removed staging leftovers %s", leftovers)
        return None
    target = root / pending["version"]
    try:
        published = verify_package(target).files.get("model.onnx") == pending["sha256"]
    except PackageError:
        published = False
    if not published:
        if target.exists():
            log.error("%s does not match the promotion journal (sha256 %s); not promoting it", target,
                      pending["sha256"][:12])
        log.warning("promotion of %s for request %s abandoned: the trainer stopped before the package was "
                    "published; the request runs again when it is re-delivered", pending["version"],
                    pending["request_id"])
        _abandon(settings)
        return "abandoned"
    log.info("finishing the promotion of %s for request %s (CURRENT, ModelUpdate, decision)", pending["version"],
             pending["request_id"])
    await _complete(settings, pending, producer, chaos=False)
    return "finished"


