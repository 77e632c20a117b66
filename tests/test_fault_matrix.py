"""Issue 29's fault matrix (tests/fault_matrix.py) against this checkout: every case ends as the
issue intends (exit 2 and one line naming what is wrong, or its documented fallback), leaving
nothing behind. Each case launches the CLI as a user would (seconds each; the two multi-rank
cases train on 2 ranks first), so all of them are the slow tier; the base runs are trained once
per session."""
import pytest

import fault_matrix as fm

from test_train import ROOT


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return fm.Workspace(ROOT, tmp_path_factory.mktemp("fault-matrix"))


def marks(case: fm.Case) -> list:
    return [pytest.mark.slow, *([pytest.mark.dist] if case.multi_rank else [])]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"case{c.number}", marks=marks(c)) for c in fm.CASES])
def test_fault_case(case, workspace):
    result = fm.run_case(case, workspace)
    failures = result.failures(case.expect)
    assert not failures, f"case {case.number} ({case.title}): {failures}\n{result.tail}"


def test_the_matrix_numbers_every_case_of_the_issue():
    numbers = {c.number.rstrip("ab") for c in fm.CASES}
    assert numbers == {str(n) for n in range(1, 25)}
    assert {c.number for c in fm.CASES if c.multi_rank} == {"1a", "1b"}
