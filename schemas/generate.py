"""Writes the JSON Schema file of every event model to ``schemas/json/``.

Run ``python -m schemas.generate`` after changing a model; ``tests/test_schemas.py`` fails while the
files on disk are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

import schemas
from schemas.http import openapi_document

JSON_DIR = Path(__file__).parent / "json"
MODELS: tuple[type[BaseModel], ...] = (
    schemas.SentimentRequest,
    schemas.LabeledEvent,
    schemas.AspectSentiment,
    schemas.DeadLetter,
    schemas.WindowStats,
    schemas.DriftAlert,
    schemas.Feedback,
    schemas.RetrainRequest,
    schemas.ModelUpdate,
    schemas.ModelManifest,
    schemas.PredictRequest,
    schemas.PredictResponse,
    schemas.HttpError,
)


def render(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(by_alias=True, mode="serialization"), indent=2, sort_keys=True) + "\n"


def expected_files() -> dict[Path, str]:
    files = {JSON_DIR / f"{model.__name__}.json": render(model) for model in MODELS}
    # The worker's HTTP endpoint (GET /openapi.json serves the same document).
    files[JSON_DIR / "openapi.json"] = json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for path, text in expected_files().items():
        path.write_text(text, encoding="utf-8")
        print(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
