"""What every target returns, and how runtimes run: in a child process, with a timeout.

A runtime given a malformed model may crash the whole process (TFLM segfaults) or hang. So
each runtime call runs in a fresh child started with ``spawn`` (no forked torch or ORT
thread state), and a crash or a time-out comes back as a failed ``TargetResult`` naming the
signal or the limit; the calling process carries on.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
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


class IsolatedRunError(RuntimeError):
    """A runtime's child process crashed, hung or raised; the message says which."""


def run_isolated(func: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """Call ``func(*args)`` in a fresh child process and return its result.

    ``func`` must be a module-level function (the child imports it by name). Raises
    IsolatedRunError naming the signal for a crash, the limit for a time-out, and the child's
    exception and traceback for an error.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(child, func, args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            proc.kill()
            proc.join()
            if proc.exitcode is not None and proc.exitcode < 0 and proc.exitcode != -signal.SIGKILL:
                raise IsolatedRunError(_signal_message(func, proc.exitcode))
            raise IsolatedRunError(f"{_name(func)} did not finish within {timeout:g} s; stopped it")
        status, payload = parent.recv()
    except EOFError:
        proc.join()
        raise IsolatedRunError(_signal_message(func, proc.exitcode)) from None
    finally:
        parent.close()
    proc.join()
    if status == "error":
        raise IsolatedRunError(f"{_name(func)} failed in its child process: {payload}")
    return payload


def _child_main(conn: Any, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = ("ok", func(*args))
    except BaseException as e:
        tb = traceback.format_exc(limit=5)
        result = ("error", f"{type(e).__name__}: {e}\n{tb}")
    conn.send(result)
    conn.close()


def _signal_message(func: Callable[..., Any], exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{_name(func)} crashed its child process with {name}"
    return f"{_name(func)} ended its child process with exit code {exitcode} and no result"


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", repr(func))
