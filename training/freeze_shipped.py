"""Fixed activation scales for the shipped packages (``sentiment freeze-scales``): the recipe per package.

Each recipe names its calibration texts (1,024 drawn with seed 0 from the package's own training data) and its
check set (the split its manifest's metrics and reference were measured on), then calls
``training.static_scales.freeze_package`` and replaces ``<models>/<name>`` with the result only when the labels
agree with the dynamic package on at least ``min_agreement`` of the check set (the export's parity rule).
Order: freeze into ``<models>/.<name>.static``, check, then swap the directories (old one removed last).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import RefusedError, UserError
from runtime.paths import MODELS_DIR, SHARED_DATA_DIR
from training.data import BINARY, THREE, load
from training.static_scales import FreezeReport, freeze_package

CALIBRATION_ROWS = 1024


@dataclass(frozen=True)
class Texts:
    texts: list[str]
    pairs: list[str] | None = None
    gold: list[int] | None = None


@dataclass(frozen=True)
class Recipe:
    calibration: Callable[[Path], Texts]
    check: Callable[[Path], Texts]


def _sample(values: list, seed: int = 0) -> list:
    rows = np.random.default_rng(seed).choice(len(values), min(CALIBRATION_ROWS, len(values)), replace=False)
    return [values[i] for i in sorted(rows)]


def _labelled(relative: str, labels: tuple[str, ...], sample: bool) -> Callable[[Path], Texts]:
    def read(data: Path) -> Texts:
        loaded = load(data / relative, list(labels))
        if sample:
            return Texts(_sample(loaded.texts))
        return Texts(loaded.texts, gold=loaded.labels)
    return read


def _absa(split: str) -> Callable[[Path], Texts]:
    def read(data: Path) -> Texts:
        from training.absa.data import LABELS, standard_splits

        splits = standard_splits()
        examples = _sample(splits.train) if split == "train" else [e for part in splits.dev.values() for e in part]
        gold = None if split == "train" else [list(LABELS).index(e.label) for e in examples]
        return Texts([e.text for e in examples], [e.aspect for e in examples], gold)
    return read


RECIPES: dict[str, Recipe] = {
    "sentiment-en": Recipe(_labelled("sst2/train.tsv", BINARY, True), _labelled("sst2/dev.tsv", BINARY, False)),
    "sentiment-en-3class": Recipe(
        _labelled("semeval2017_task4a/train_pool_minus_tweeteval_val.tsv", THREE, True),
        _labelled("tweeteval/sentiment/val_text.txt", THREE, False)),
    "absa-en": Recipe(_absa("train"), _absa("dev")),
}


def freeze_shipped(name: str, models: Path = MODELS_DIR, data: Path = SHARED_DATA_DIR,
                   min_agreement: float = 0.995) -> FreezeReport:
    """Freezes ``<models>/<name>`` in place (module docstring: the order); raises RefusedError below the gate."""
    if name not in RECIPES:
        raise UserError(f"no recipe for {name!r}; known: {', '.join(RECIPES)}")
    recipe, target = RECIPES[name], models / name
    if not target.is_dir():
        raise UserError(f"{target}: no such package")
    calibration, check = recipe.calibration(data), recipe.check(data)
    staged = models / f".{name}.static"
    report = freeze_package(target, staged, calibration.texts, check.texts, calibration.pairs, check.pairs,
                            check.gold)
    if report.label_agreement < min_agreement:
        shutil.rmtree(staged)
        raise RefusedError(f"{name}: labels agree on {report.label_agreement:.4f} of the check set, below "
                           f"{min_agreement}: {json.dumps(report.as_dict())}")
    retired = models / f".{name}.dynamic"
    target.rename(retired)
    staged.rename(target)
    shutil.rmtree(retired)
    return report
