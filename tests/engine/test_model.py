from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.model import (
    MANIFEST,
    MANIFEST_VERSION,
    REQUIRED_FILES,
    ModelError,
    check_model_folder,
    is_complete,
)


def make_folder(tmp_path: Path, manifest: dict[str, object] | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    sizes = {}
    for name in REQUIRED_FILES:
        (folder / name).write_bytes(b"x" * 10)
        sizes[name] = 10
    data = manifest if manifest is not None else {"version": MANIFEST_VERSION,
                                                  "files": sizes}
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder


def test_a_finished_preparation_is_complete(tmp_path: Path) -> None:
    assert is_complete(make_folder(tmp_path))


def test_a_truncated_file_makes_it_incomplete(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"x" * 3)
    assert not is_complete(folder)


def test_a_missing_file_makes_it_incomplete(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / "tokenizer.json").unlink()
    assert not is_complete(folder)


@pytest.mark.parametrize("manifest", [{}, {"version": 99, "files": {"a": 1}},
                                      {"version": MANIFEST_VERSION, "files": []},
                                      {"version": MANIFEST_VERSION, "files": {"config.json": 10}}])
def test_foreign_or_partial_manifests_are_incomplete(tmp_path: Path,
                                                      manifest: dict[str, object]) -> None:
    assert not is_complete(make_folder(tmp_path, manifest))


def test_no_manifest_is_incomplete(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    (folder / MANIFEST).unlink()
    assert not is_complete(folder)
    (folder / MANIFEST).write_text("{not json")
    assert not is_complete(folder)


def test_check_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        check_model_folder(tmp_path / "nope")
    with pytest.raises(ModelError, match="config.json"):
        check_model_folder(tmp_path)
    check_model_folder(make_folder(tmp_path))
