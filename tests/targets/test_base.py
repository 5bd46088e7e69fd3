"""The child-process runner: a crash, a hang or an error never takes the caller down."""

import pytest

from edgekiln.targets.base import IsolatedRunError, run_isolated
from tests.targets import _child_funcs as f


def test_result_comes_back():
    assert run_isolated(f.add, 2, 3) == 5


def test_segfault_is_named():
    with pytest.raises(IsolatedRunError, match="crashed its child process with SIGSEGV"):
        run_isolated(f.segfault)


def test_hang_is_stopped():
    with pytest.raises(IsolatedRunError, match="did not finish within 1 s"):
        run_isolated(f.hang, timeout=1)


def test_error_carries_message():
    with pytest.raises(IsolatedRunError, match="ValueError: bad model"):
        run_isolated(f.boom)
