"""Contracts on disk: JSON Schema files are current; a tampered model package is refused."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.inference import Classifier
from runtime.package import PackageError, set_current, verify_package
from schemas import LabeledEvent, SentimentRequest
from schemas.generate import expected_files


def test_json_schema_files_are_up_to_date():
    stale = [path.name for path, text in expected_files().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert not stale, f"run `make schemas`: stale {stale}"


def test_labeled_event_serialises_schema_field_by_its_public_name():
    schema = json.loads(expected_files()[next(p for p in expected_files() if p.name == "LabeledEvent.json")])
    assert "schema" in schema["properties"] and "schema_" not in schema["properties"]
    assert LabeledEvent.model_fields["schema_"].alias == "schema"


def test_request_ignores_unknown_fields_and_passes_metadata_through():
    request = SentimentRequest.model_validate({"text": "hi", "unknown": 1, "metadata": {"trace": "abc"}})
    assert request.metadata == {"trace": "abc"}


@pytest.mark.parametrize("victim", ["model.onnx", "tokenizer.json", "manifest-files"])
def test_tampered_package_is_refused(tiny_model, tmp_path, victim):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_model, package)
    if victim == "manifest-files":
        manifest = json.loads((package / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = "0" * 64
        (package / "manifest.json").write_text(json.dumps(manifest))
    else:
        with (package / victim).open("ab") as handle:
            handle.write(b"\x00")
    with pytest.raises(PackageError):
        Classifier.load(package)


def test_manifest_path_escaping_the_package_is_refused(tiny_model, tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(tiny_model, package)
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"]["../outside"] = "0" * 64
    (package / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="outside"):
        verify_package(package)


def test_registry_pointer_resolves_to_the_current_version(tiny_model, tmp_path):
    root = tmp_path / "registry" / "tiny"
    shutil.copytree(tiny_model, root / "v1")
    set_current(root, "v1")
    assert Classifier.load(root).package_dir == root / "v1"
