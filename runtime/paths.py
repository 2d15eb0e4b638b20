"""Where things live: the one home of every default path.

``SENTIMENT_MODELS_DIR`` roots every default model package (a wheel or a container sets it to wherever the
packages were copied); without it the repository's ``models/`` is used. ``SENTIMENT_SHARED_DATA`` points at
the labelled data sets, which live beside the repository and never inside it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("SENTIMENT_MODELS_DIR") or REPO_ROOT / "models")
SHARED_DATA_DIR = Path(os.environ.get("SENTIMENT_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")

DEFAULT_MODEL_DIR = MODELS_DIR / "sentiment-en"
DEFAULT_ABSA_DIR = MODELS_DIR / "absa-en"
DEFAULT_TAGGER_DIR = MODELS_DIR / "aspect-tagger-en"
DEFAULT_EMBEDDER_DIR = MODELS_DIR / "minilm-embed-en"
# The configured aspect categories are the worker's configuration; training reads them as data.
DEFAULT_CATEGORIES = REPO_ROOT / "worker" / "aspect_categories.json"
