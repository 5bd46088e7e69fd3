"""Functions the simulator tests start in child processes: TFLM itself (it may crash)."""

from __future__ import annotations

import numpy as np


def run_tflm_all(model: bytes, x: np.ndarray, num_tensors: int) -> dict:
    """Run TFLM sample by sample with every tensor preserved; return outputs and all tensors."""
    from tflite_micro import runtime

    interp = runtime.Interpreter.from_bytes(
        model,
        arena_size=max(len(model) * 20, 1 << 20),
        intrepreter_config=runtime.InterpreterConfig.kPreserveAllTensors,
    )
    outs: list[np.ndarray] = []
    tensors: dict[int, list[np.ndarray]] = {}
    for i in range(x.shape[0]):
        interp.set_input(x[i : i + 1], 0)
        interp.invoke()
        outs.append(np.array(interp.get_output(0)))
        for t in range(num_tensors):
            try:
                v = interp.GetTensor(t, 0)
            except Exception:  # constants or tensors TFLM does not expose
                continue
            if v is not None:
                tensors.setdefault(t, []).append(
                    np.array(v["tensor_data"] if isinstance(v, dict) else v)
                )
    return {
        "output": np.concatenate(outs, axis=0),
        "tensors": {t: np.concatenate(vs, axis=0) for t, vs in tensors.items()},
    }


def run_tflm_many(cases: list[tuple[bytes, np.ndarray]]) -> list[dict | str]:
    """``run_tflm_all`` for many models in one child; a refused model gives its error text."""
    from edgekiln.formats.tflite import read_tflite

    results: list[dict | str] = []
    for model, x in cases:
        try:
            results.append(run_tflm_all(model, x, len(read_tflite(model).tensors)))
        except RuntimeError as e:
            results.append(f"{type(e).__name__}: {e}")
    return results


def tflm_arena_head(models: list[bytes]) -> list[int]:
    """TFLM's planned non-persistent arena ("head" of print_allocations) for each model."""
    import os
    import re
    import tempfile

    from tflite_micro import runtime

    heads = []
    for model in models:
        interp = runtime.Interpreter.from_bytes(model, arena_size=1 << 22)
        shape = interp.get_input_details(0)["shape"]
        interp.set_input(np.zeros(shape, np.int8), 0)
        interp.invoke()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as f:
            os.dup2(f.fileno(), 2)
            try:
                interp.print_allocations()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            f.seek(0)
            text = f.read().decode(errors="replace")
        heads.append(int(re.search(r"Arena allocation head (\d+)", text).group(1)))
    return heads


def tflm_invoke_seconds(model: bytes, x: np.ndarray) -> tuple[float, float]:
    """(CPU, wall) seconds TFLM spends on ``set_input`` + ``invoke`` over the batch ``x``."""
    import time

    from tflite_micro import runtime

    interp = runtime.Interpreter.from_bytes(model, arena_size=max(len(model) * 20, 1 << 20))
    interp.set_input(x[:1], 0)
    interp.invoke()  # warm-up: first invoke allocates nothing more, but pages memory in
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(x.shape[0]):
        interp.set_input(x[i : i + 1], 0)
        interp.invoke()
        interp.get_output(0)
    return time.process_time() - c0, time.perf_counter() - t0
