"""The child side of ``run_isolated``: ``python -m edgekiln.targets._isolated WORKDIR``.

Reads ``(module, qualname, args)`` from ``WORKDIR/call.pkl``, calls the function and writes
``("ok", result)`` or ``("error", message)`` to ``WORKDIR/result.pkl``. A crash writes nothing;
the parent reads the exit status.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any


def main(workdir: str) -> int:
    work = Path(workdir)
    with open(work / "call.pkl", "rb") as f:
        module, qualname, args = pickle.load(f)  # written by our own parent
    try:
        func: Any = importlib.import_module(module)
        for part in qualname.split("."):
            func = getattr(func, part)
        result: tuple[str, Any] = ("ok", func(*args))
    except BaseException as e:  # everything goes back to the parent
        tb = traceback.format_exc(limit=5)
        result = ("error", f"{type(e).__name__}: {e}\n{tb}")
    tmp = work / "result.pkl.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(work / "result.pkl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
