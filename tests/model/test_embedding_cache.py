"""The backbone embedding cache: its sqlite file is the owner's alone, and old entries can be purged."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from hematovision.model.embeddings import EmbeddingCache


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    previous = os.umask(0o022)  # the usual default: files 0644
    yield
    os.umask(previous)


def test_the_cache_file_and_its_wal_files_are_owner_only(tmp_path, open_umask):
    path = tmp_path / "cache" / "embeddings.sqlite"
    with EmbeddingCache(path) as cache:
        cache.store("bb", ["a" * 64], np.ones((1, 4), np.float32))
        for name in ("embeddings.sqlite", "embeddings.sqlite-wal", "embeddings.sqlite-shm"):
            assert mode(path.parent / name) == 0o600, name

    # A cache made before (world-readable) is tightened when opened.
    old = tmp_path / "old.sqlite"
    old.touch(mode=0o644)
    os.chmod(old, 0o644)
    EmbeddingCache(old).close()
    assert mode(old) == 0o600
