"""The model-folder guard: confinement through symlinks, size and count caps, file kinds.

Pure filesystem checks (no model is loaded): the same function runs on the coordinator at
submit time and on the worker right before loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rev_tasks.inference.guard import (
    ModelTooLarge,
    NotRegularFile,
    PathOutsideRoots,
    inspect_folder,
)
from rev_tasks.inference.loader import ModelLoadError, UnsafeWeightsError, check_model_folder


def _model(folder: Path, weights: bytes = b"w" * 100) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return root, outside


def test_plain_folder_is_measured(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    folder = _model(root / "m")
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.json").write_text("x" * 10)
    assert inspect_folder(folder, [root], max_bytes=10_000) == 100 + 2 + 2 + 10


def test_folder_outside_roots(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    with pytest.raises(PathOutsideRoots):
        inspect_folder(_model(outside / "m"), [root], max_bytes=10_000)


def test_symlinked_folder_pointing_outside(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    target = _model(outside / "m")
    link = root / "link"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(PathOutsideRoots):
        inspect_folder(link, [root], max_bytes=10_000)


def test_symlinked_weights_pointing_outside(roots: tuple[Path, Path]) -> None:
    """A folder inside the root whose weights file links to a file outside it."""
    root, outside = roots
    folder = _model(root / "m")
    secret = outside / "secret.bin"
    secret.write_bytes(b"s" * 10)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    with pytest.raises(PathOutsideRoots, match="model.safetensors"):
        inspect_folder(folder, [root], max_bytes=10_000)


def test_symlinked_subfolder_pointing_outside(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    folder = _model(root / "m")
    (folder / "shards").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathOutsideRoots):
        inspect_folder(folder, [root], max_bytes=10_000)


def test_symlink_within_roots_is_fine_and_counted(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    shared = root / "shared.bin"
    shared.write_bytes(b"x" * 50)
    folder = _model(root / "m")
    (folder / "extra.bin").symlink_to(shared)
    assert inspect_folder(folder, [root], max_bytes=10_000) == 100 + 4 + 50


def test_symlink_cycle_terminates(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    folder = _model(root / "m")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    assert inspect_folder(folder, [root], max_bytes=10_000) == 104


def test_broken_link(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    folder = _model(root / "m")
    (folder / "dangling").symlink_to(root / "nothing")
    with pytest.raises(ModelLoadError, match="broken link"):
        inspect_folder(folder, [root], max_bytes=10_000)


def test_size_cap(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    folder = _model(root / "m", weights=b"w" * 5000)
    with pytest.raises(ModelTooLarge, match="REV_MAX_MODEL_BYTES"):
        inspect_folder(folder, [root], max_bytes=4000)
    # A sparse file counts by its apparent size: a "500 GB" file is refused without reading.
    with open(folder / "huge.bin", "wb") as fh:
        fh.truncate(10**12)
    with pytest.raises(ModelTooLarge):
        inspect_folder(folder, [root], max_bytes=20_000_000_000)


def test_file_count_cap(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    folder = _model(root / "m")
    for i in range(20):
        (folder / f"f{i}.json").write_text("{}")
    with pytest.raises(ModelTooLarge, match="entries"):
        inspect_folder(folder, [root], max_bytes=10_000, max_files=10)


def test_fifo_is_refused(roots: tuple[Path, Path]) -> None:
    root, _ = roots
    folder = _model(root / "m")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(NotRegularFile):
        inspect_folder(folder, [root], max_bytes=10_000)


def test_no_roots_means_no_confinement(roots: tuple[Path, Path]) -> None:
    _, outside = roots
    assert inspect_folder(_model(outside / "m"), None, max_bytes=10_000) == 104


def test_pickle_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(UnsafeWeightsError, match="REV_ALLOW_PICKLE"):
        check_model_folder(folder)
    check_model_folder(folder, allow_pickle=True)  # an operator's explicit choice


def test_config_json_has_its_own_cap(roots: tuple[Path, Path]) -> None:
    """A sparse 1 GiB config.json fits a 20 GB total but must never be read whole."""
    root, _ = roots
    folder = _model(root / "m")
    with open(folder / "config.json", "wb") as fh:
        fh.truncate(1 << 30)
    with pytest.raises(ModelTooLarge, match="config.json .*REV_MAX_CONFIG_BYTES"):
        inspect_folder(folder, [root], max_bytes=20_000_000_000)
    (folder / "config.json").write_text("{}")
    (folder / "generation_config.json").write_text("x" * 5000)
    with pytest.raises(ModelTooLarge, match="generation_config.json"):
        inspect_folder(folder, [root], max_bytes=10_000, max_config_bytes=4096)
    (folder / "generation_config.json").write_text("{}")
    assert inspect_folder(folder, [root], max_bytes=10_000, max_config_bytes=4096) == 106
