"""``sentiment models``: what the registry holds (``list``), and moving ``CURRENT`` back by hand (``rollback``).

Both work on the registry model directory ``<registry>/<name>/`` (``--registry``/``--name``, default
``SENTIMENT_REGISTRY_DIR``/``SENTIMENT_MODEL_NAME``, read by ``TrainerSettings`` like the trainer's). This module
holds the logic; the commands themselves are ``cli/models.py``.

``list`` reads only. One line per published version (``registry.list_versions``), oldest first (versions are
UTC timestamps, so name order is time order): ``*`` when ``CURRENT`` names it, the version, ``model.onnx``'s
sha256 as the manifest lists it (12 characters; the worker checks the hashes when it loads), ``signed``
(``manifest.sig`` is present; whether it verifies is the worker's check, with its key), the manifest's
``created_at``, and the last decision in ``decisions.jsonl`` that promoted the version (request id, reason,
holdout and feedback scores of champion → challenger), if any. ``--json``: one JSON object per version.

``rollback VERSION`` makes a published version ``CURRENT`` again and tells the workers, in this order:
    R1. checks, each refusing with ``Refused`` (a ``UserError``: exit 2, one line on stderr), before anything
        changes: the registry model directory exists; no promotion is unfinished (``PENDING``); VERSION is
        published and is not ``CURRENT`` already; its package verifies (``verify_package``: every file's sha256)
        and names this model; with ``SENTIMENT_VERIFY_KEY``, ``load_package`` with that key accepts it (the
        workers would refuse it otherwise). A rollback never re-signs: the private key stays with the trainer;
    R2. starts the producer (acks=all): a broker that cannot be reached changes nothing (exit 1);
    R3. the trainer's P2 and P4-P7 (``promotion.promote_published``): write the journal (the exact
        ``ModelUpdate``, request id ``rollback-<uuid>``, ``previous_version`` the old ``CURRENT``, and the
        decision line: promoted, reason ``rollback: <reason>``), point ``CURRENT``, send the update and wait
        for the acknowledgement, append the decision, delete the journal.

Invariants (the reason in brackets):
    * a refused rollback changes nothing [R1 before R2-R3].
    * whenever ``CURRENT`` may name a version that the last ``ModelUpdate`` does not, the journal exists
      [P2 before P4, P7 after P5]; the trainer's start-up recovery (``finish_pending``) finds the version
      published and rolls the rollback forward, so a crash or an error after R3 began converges (exit 1 says
      so).
    * one promotion at a time, one journal [R1 refuses while ``PENDING`` exists]. That check cannot fence a
      trainer that starts a promotion at the same moment, so roll back while the trainer is idle or stopped.
    * ``decisions.jsonl`` stays append-only and says promoted only for an acknowledged update [P6 after P5].

Exit codes: 0 done; 1 failed after the checks (broker, disk: ``RollbackFailed``); 2 refused or bad usage.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from runtime.errors import SentimentError, UserError
from runtime.package import PackageError, load_package, read_manifest, verify_package
from runtime.settings import TrainerSettings
from runtime.signing import SIGNATURE_FILE, SignatureError, load_public_key
from schemas import ModelManifest
from training.job import Decision, recorded_decisions
from training.promotion import promote_published, read_pending
from training.registry import current_version, list_versions


class ModelsSettings(TrainerSettings):
    """The trainer's settings plus the workers' verification key, so a rollback refuses what workers refuse."""

    verify_key: Path | None = Field(default=None, description=(
        "Ed25519 public key (PEM), as the workers' SENTIMENT_VERIFY_KEY: a rollback target must verify with it."))


class Refused(UserError):
    """A check failed before anything changed (exit 2: the request names a version or registry it must not)."""


class RollbackFailed(SentimentError):
    """The broker or the disk failed after the checks (exit 1); the message says whether CURRENT moved."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------ list


def promoting_decisions(settings: TrainerSettings) -> dict[str, dict]:
    """Version → the last decision that promoted it (a gate's or a rollback's)."""
    return {d["challenger_version"]: d for d in recorded_decisions(settings)
            if d.get("promoted") and isinstance(d.get("challenger_version"), str)}


def version_row(root: Path, version: str, current: str | None, decision: dict | None) -> dict:
    """What ``list`` shows of one version; an unreadable manifest is reported in ``error``, not raised."""
    row: dict = {"version": version, "current": version == current, "sha256": None,
                 "signed": (root / version / SIGNATURE_FILE).is_file(), "created_at": None, "decision": None}
    try:
        manifest = read_manifest(root / version)
    except PackageError as exc:
        row["error"] = one_line(exc)
    else:
        row["sha256"] = manifest.files["model.onnx"]
        row["created_at"] = manifest.created_at.isoformat() if manifest.created_at else None
    if decision is not None:
        row["decision"] = {key: decision.get(key) for key in
                           ("request_id", "promoted", "reason", "champion_version", "scores", "finished_at")}
    return row


def format_scores(scores: dict) -> str:
    parts = [f"{part} {scores[f'{part}_champion']:.3f}→{scores[f'{part}_challenger']:.3f}"
             for part in ("holdout", "feedback")
             if scores.get(f"{part}_champion") is not None and scores.get(f"{part}_challenger") is not None]
    return f" ({', '.join(parts)})" if parts else ""


def format_row(row: dict, width: int = 0) -> str:
    """One line: ``width`` pads the version so the columns line up."""
    marker = "*" if row["current"] else " "
    sha = (row["sha256"] or "?")[:12]
    head = f"{marker} {row['version']:<{width}}  sha256 {sha:<12}  signed {'yes' if row['signed'] else 'no '}  " \
           f"created {row['created_at'] or '-'}"
    if "error" in row:
        return f"{head}  INVALID: {row['error']}"
    decision = row["decision"]
    if decision is None:
        return f"{head}  no promoting decision recorded"
    scores = format_scores(decision["scores"] or {})
    return f"{head}  promoted by {decision['request_id']}: {decision['reason']}{scores}"


def registry_versions(settings: TrainerSettings) -> tuple[list[str], str | None]:
    """(published versions oldest first, the version CURRENT names)."""
    return (list_versions(settings.registry_dir, settings.model_name),
            current_version(settings.registry_dir, settings.model_name))


# -------------------------------------------------------------------------------------------- rollback


def check_target(settings: ModelsSettings, version: str) -> tuple[ModelManifest, str | None]:
    """R1 after the registry check: the target's manifest and the current version; raises ``Refused``."""
    if (pending := read_pending(settings)) is not None:
        raise Refused(f"a promotion is unfinished ({settings.promotion_journal}: version {pending.get('version')}, "
                      f"request {pending.get('request_id')}); start the trainer, its recovery finishes it")
    versions = list_versions(settings.registry_dir, settings.model_name)
    if version not in versions:
        raise Refused(f"unknown version {version!r} (published: {', '.join(versions) or 'none'})")
    current = current_version(settings.registry_dir, settings.model_name)
    if version == current:
        raise Refused(f"{version} is already CURRENT")
    target = model_root(settings) / version
    try:
        manifest = verify_package(target)
        if settings.verify_key is not None:
            load_package(target, load_public_key(settings.verify_key))
    except (PackageError, SignatureError) as exc:
        raise Refused(f"{version} does not verify: {one_line(exc)}") from exc
    if manifest.name != settings.model_name:
        raise Refused(f"{version} is a package of model {manifest.name!r}, not {settings.model_name!r}")
    return manifest, current


async def rollback(settings: ModelsSettings, manifest: ModelManifest, version: str, current: str | None,
                   reason: str) -> Decision:
    """R2-R3: the producer first (an unreachable broker changes nothing), then the journaled steps."""
    from aiokafka import AIOKafkaProducer

    decision = Decision(f"rollback-{uuid.uuid4()}", False, f"rollback: {reason}", challenger_version=version,
                        champion_version=current, finished_at=datetime.now(UTC).isoformat())
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all")
    try:
        await producer.start()
        return await promote_published(settings, decision, manifest, producer)
    finally:
        await producer.stop()


def rollback_to(settings: ModelsSettings, version: str, reason: str) -> tuple[Decision, ModelManifest, str | None]:
    """R1-R3; returns (the decision, the target's manifest, the previous CURRENT). Raises ``Refused`` before
    anything changed, ``RollbackFailed`` after the checks (saying whether CURRENT may have moved)."""
    model_root(settings)
    manifest, current = check_target(settings, version)
    try:
        decision = asyncio.run(rollback(settings, manifest, version, current, reason))
    except Exception as exc:  # after the checks: a broker or disk failure
        journal = settings.promotion_journal
        after = (f"; CURRENT may have moved: {journal} stays and the trainer's start-up recovery finishes the "
                 "rollback") if journal.exists() else "; nothing changed"
        raise RollbackFailed(f"rollback failed: {one_line(repr(exc))}{after}") from exc
    return decision, manifest, current


# -------------------------------------------------------------------------------------------- registry


def model_root(settings: TrainerSettings) -> Path:
    """``<registry>/<name>``; ``Refused`` when it does not exist (a typo must not look like an empty registry)."""
    root = settings.registry_dir / settings.model_name
    if not root.is_dir():
        raise Refused(f"no registry model directory {root} (SENTIMENT_REGISTRY_DIR / SENTIMENT_MODEL_NAME, "
                      "or --registry / --name)")
    return root
