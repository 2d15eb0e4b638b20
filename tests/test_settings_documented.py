"""Every setting of every service has a row in the README's configuration tables (issue 16: "every setting
documented"), and the tables name no setting that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

from runtime.settings import SERVICES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
DOCUMENTED = set(re.findall(r"^\| `(SENTIMENT_[A-Z0-9_]+)` \|", README, re.M))
# Read outside the settings classes (runtime/paths.py); documented in the same section.
PATH_VARIABLES = {"SENTIMENT_MODELS_DIR", "SENTIMENT_SHARED_DATA"}


def variables() -> dict[str, str]:
    return {f"SENTIMENT_{name.upper()}": service for service, cls in SERVICES.items() for name in cls.model_fields}


def test_every_setting_of_every_service_has_a_readme_row():
    missing = sorted(f"{var} ({service})" for var, service in variables().items() if var not in DOCUMENTED)
    assert not missing, f"undocumented settings: {missing}"


def test_the_readme_documents_no_setting_that_does_not_exist():
    assert DOCUMENTED, "no configuration rows found: the pattern above would make both tests vacuous"
    stale = sorted(DOCUMENTED - set(variables()))
    assert not stale, f"README rows for settings no class reads: {stale}"
    assert all(var in README for var in PATH_VARIABLES)
