"""The native ops for a test module, or a skip that says why they did not build.

CI sets FASTWIDTH_REQUIRE_NATIVE=1 (.ci/run): there a failed build fails the tests instead.
"""
import os

import pytest

from fastwidth.errors import UserError
from fastwidth.kernels import native


def native_or_skip():
    try:
        return native.load()
    except UserError as e:
        if os.environ.get("FASTWIDTH_REQUIRE_NATIVE"):
            raise
        pytest.skip(str(e), allow_module_level=True)
