"""What every target returns, and how runtimes run: in a child process, with a timeout.

A runtime given a malformed model may crash the whole process (TFLM segfaults) or hang. So
each runtime call runs in a fresh Python interpreter (no forked torch or ORT thread state),
and a crash or a time-out comes back as a failed ``TargetResult`` naming the signal or the
limit; the calling process carries on.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Latency:
    """Per-inference latency of one runtime: warm-up runs first, then ``runs`` timed ones."""

    median_ms: float
    p90_ms: float
    runs: int
    warmup: int
    threads: int
    batch: int = 1
    estimated: bool = False  # True for the simulator's latency model, False when measured

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class TargetResult:
    """The outcome of running one artifact on one target.

    ``outputs`` holds the first graph output exactly as the runtime stored it (int8 for an
    int8 artifact), batch first, in PyTorch's layout (a TFLite NHWC output is transposed
    back). ``output_scale`` and ``output_zero_point`` turn it into real values and LSB.
    """

    target: str
    artifact: str
    ok: bool
    error: str | None = None
    outputs: np.ndarray | None = None
    output_scale: float | None = None
    output_zero_point: int | None = None
    accuracy: float | None = None
    latency: Latency | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def real_outputs(self) -> np.ndarray:
        """Outputs as float32 real values."""
        if self.outputs is None:
            raise ValueError(f"target {self.target!r} has no outputs: {self.error}")
        if self.outputs.dtype == np.float32 or self.output_scale is None:
            return self.outputs.astype(np.float32)
        zp = self.output_zero_point or 0
        return (self.output_scale * (self.outputs.astype(np.float32) - zp)).astype(np.float32)


def check_labels(y: np.ndarray | None, n: int) -> np.ndarray | None:
    """``y`` as ``n`` integer class labels, checked before any runtime starts (None passes).

    >>> check_labels(np.array([0, 2]), 2)
    array([0, 2])
    """
    if y is None:
        return None
    labels = np.asarray(y)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels y have shape {labels.shape} and dtype {labels.dtype}; y must be {n} "
            f"integer class labels of shape ({n},), one per sample of x (e.g. "
            "y.astype(np.int64)), or no y"
        )
    return labels


class IsolatedRunError(RuntimeError):
    """A runtime's child process crashed, hung or raised; the message says which."""


def run_isolated(func: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """Call ``func(*args)`` in a fresh Python child process and return its result.

    ``func`` must be importable by module and name (a module-level function of an installed
    module). The child is a new interpreter running ``edgekiln.targets._isolated``: it never
    imports the caller's ``__main__`` (so an unguarded script or a notebook is safe), and the
    arguments and the result travel through files, so a child that dies early cannot leave
    the parent blocked on a pipe. Raises IsolatedRunError naming the signal for a crash, the
    limit for a time-out, and the child's exception for an error.
    """
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not module or module == "__main__" or "<" in name:
        raise ValueError(
            f"run_isolated needs a module-level function of an importable module, got "
            f"{module}.{name}; move it into a module"
        )
    with tempfile.TemporaryDirectory(prefix="edgekiln-child-") as tmp:
        work = Path(tmp)
        with open(work / "call.pkl", "wb") as f:
            pickle.dump((module, name, args), f, protocol=pickle.HIGHEST_PROTOCOL)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with open(work / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgekiln.targets._isolated", str(work)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
            )
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise IsolatedRunError(
                    f"{name} did not finish within {timeout:g} s; stopped it"
                ) from None
        result_file = work / "result.pkl"
        if code != 0 or not result_file.exists():
            raise IsolatedRunError(_exit_message(name, code, _tail(work / "stderr")))
        with open(result_file, "rb") as f:
            status, payload = pickle.load(f)  # our own child's file, written just now
    if status == "error":
        raise IsolatedRunError(f"{name} failed in its child process: {payload}")
    return payload


def _exit_message(name: str, code: int, stderr: str) -> str:
    if code < 0:
        try:
            what = signal.Signals(-code).name
        except ValueError:
            what = f"signal {-code}"
        message = f"{name} crashed its child process with {what}"
    else:
        message = f"{name} ended its child process with exit code {code} and no result"
    return f"{message}; its last output: {stderr}" if stderr else message


def _tail(path: Path, limit: int = 600) -> str:
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return text[-limit:]
