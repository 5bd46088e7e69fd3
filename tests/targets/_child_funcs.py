"""Module-level functions the runner tests start in child processes."""

import os
import signal
import time


def add(a: int, b: int) -> int:
    return a + b


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def hang() -> None:
    time.sleep(60)


def boom() -> None:
    raise ValueError("bad model")
