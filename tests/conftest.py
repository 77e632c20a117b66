import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tests share 2 cores with a second pytest worker or a launched rank: keep torch to one thread
# unless a test asks otherwise, so timings are stable and ranks do not oversubscribe.
torch.set_num_threads(int(os.environ.get("FASTWIDTH_TEST_THREADS", "1")))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private data cache so tests never depend on what an earlier run left behind."""
    d = tmp_path / "cache"
    d.mkdir()
    return str(d)
