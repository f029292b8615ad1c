"""Shared fixtures: the upstream parity vectors (tests/fixtures/upstream, read through their manifest) and a quiet,
deterministic torch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


BUNDLED_VECTORS = REPO_ROOT / "tests" / "fixtures" / "upstream"


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    """The upstream reference vectors: the copy in tests/fixtures/upstream, or another set (e.g. a held-out one)
    named by MLCD_VL_VECTORS. Missing vectors fail the tests that need them; they never skip silently."""
    env = os.environ.get("MLCD_VL_VECTORS")
    found = Path(env).expanduser() if env else BUNDLED_VECTORS
    if not (found / "manifest.json").is_file():
        pytest.fail(f"upstream vectors not found: {found}/manifest.json"
                    + (" (MLCD_VL_VECTORS)" if env else " (the repository's own copy is missing)"))
    return found


@pytest.fixture(scope="session")
def manifest(vectors_dir: Path) -> dict:
    return json.loads((vectors_dir / "manifest.json").read_text())


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """The data cache (record indices, length tables, manifests) in a temporary folder, never the user's own."""
    from mlcd_vl.data.cache import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def single_thread():
    """One torch thread: the parity vectors were made with one, and it keeps CPU tests from fighting over cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    """A temporary folder shared by the tests of one module (converted checkpoints are reused across tests)."""
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny preset's LLM and MLCD tower folders (`model.tiny`, random weights), written once per session."""
    from mlcd_vl.model.tiny import write_tiny_assets

    return write_tiny_assets(tmp_path_factory.getbasetemp() / "tiny-assets")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """The untrained tiny anyres model (`model.tiny.build_tiny_vlm`) as an HF-native folder, built once per
    session; tests that change it copy it first."""
    from mlcd_vl.model.tiny import build_tiny_vlm

    root = tmp_path_factory.getbasetemp() / "tiny-vlm"
    if not (root / "model" / "config.json").is_file():
        build_tiny_vlm(root)
    return root / "model"
