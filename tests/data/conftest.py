import dataclasses

import pytest

from fastwidth.config import DataConfig


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token/tokenizer cache for the whole session (the stdlib corpus is tokenized once)."""
    return tmp_path_factory.mktemp("fw_cache")


@pytest.fixture
def dcfg(cache_dir):
    def make(**kw):
        kw.setdefault("cache_dir", str(cache_dir))
        return dataclasses.replace(DataConfig(), **kw)

    return make
