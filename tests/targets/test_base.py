"""The child-process runner: a crash, a hang or an error never takes the caller down."""

import os
from pathlib import Path

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


def test_main_module_functions_are_refused_with_the_way_out():
    def local():
        return 1

    with pytest.raises(ValueError, match="module-level function of an importable module"):
        run_isolated(local)


def test_unguarded_script_calling_a_runtime_does_not_hang(tmp_path):
    """A script without `if __name__ == "__main__"` is never re-run in the child."""
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(
        "import numpy as np\n"
        "from edgekiln.targets.base import run_isolated\n"
        "from tests.targets._child_funcs import add\n"
        "big = np.zeros(2_000_000, dtype=np.float32)\n"  # 8 MB of arguments, past any pipe buffer
        "print(run_isolated(add, 2, 3), run_isolated(np.sum, big))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(Path(__file__).parents[2]),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "0.0"]
