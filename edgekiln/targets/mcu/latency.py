"""A per-layer latency model for TFLM on Cortex-M cores, calibrated on published measurements.

Each layer costs ``MACs x cycles_per_MAC`` (per op kind, core family and kernel library), plus
``elements x cycles_per_element`` for the element-wise ops, plus a fixed TFLM dispatch cost per
operator. The result is an ESTIMATE (``Latency(estimated=True)``); every coefficient names its
source and derivation below.

Anchor: the MLPerf Tiny v0.5 closed-division reference submission (Banbury et al., "MLPerf Tiny
Benchmark", NeurIPS 2021 Datasets and Benchmarks, arXiv:2106.07597). Its published logs
(github.com/mlcommons/tiny_results_v0.5, ``closed/reference/results/Nucleo-L4R5ZI/<task>/
performance/results.txt``, median throughput of 5 windows) on NUCLEO-L4R5ZI (STM32L4R5ZI,
Cortex-M4F at 120 MHz; ``closed/reference/systems/Nucleo_L4R5ZI_System_Description.json``),
TFLM v2.3.1 built with ``TAGS=cmsis-nn`` (mlcommons/tiny ``v0.1/reference_submissions/*/
setup_example.sh``), give the latencies in ``MLPERF_TINY_V05_L4R5ZI_MS``. The cycles per MAC
are solved from them, one op kind per model, and include everything the board pays (flash wait
states behind the ART cache, requantization, TFLM's per-op work):

- CONV_2D: ResNet-8 is convolutions for 99.99% of its 12.50 M MACs:
  704.2 ms x 120 MHz / 12.50 M = 6.76 cycles/MAC.
- DEPTHWISE_CONV_2D: DS-CNN has 2.37 M convolution and 0.288 M depthwise MACs:
  (181.9 ms x 120 MHz - 2.37 M x 6.76) / 0.288 M = 20.2 cycles/MAC, 3x a convolution: CMSIS-NN's
  depthwise kernels reuse nothing across channels and pay per-channel loads and requantization.
- FULLY_CONNECTED: the anomaly-detection autoencoder is dense layers only (264,192 MACs):
  10.05 ms x 120 MHz / 264,192 = 4.56 cycles/MAC (every weight is used once, so flash bound).

MobileNetV1-0.25 (visual wake words) is left out of the fit: the model predicts it (0.85x of
the published 600.6 ms; tests pin all three within 2x). Cross-check: Lai, Suda and Chandra,
"CMSIS-NN" (arXiv:1801.06601, 2018) measured 1.74 cycles/MAC for a whole CIFAR-10 CNN on a
216 MHz Cortex-M7 running from its caches; scaled to an M4 by CoreMark/MHz that is 2.55, so
TFLM 2.3.1 on the L4R5's flash runs at about 2.7x that best case.

Other cores scale the M4 figures by Arm's published CoreMark/MHz (Cortex-M0+ 2.46, M4 3.42,
M33 4.02, M7 5.01, M55 4.2) for integer code; flash differs by ``(wait_states - 5) / 4``
cycles per MAC (one 32-bit weight load per 4 MACs; the anchor board runs 5 wait states). Each
board gives its own ``flash_wait_states`` (boards.py); one that gives none is estimated at the
anchor's 5, and ``flash_wait_states`` says so (``assumed``), as does a warning.
M0+ has no DSP (SMLAD) instructions, so CMSIS-NN falls back to plain C there: the
reference-kernel factor applies, 4.6x (Lai et al. 2018: CMSIS-NN convolutions vs the plain C
baseline). For M55 the Helium (MVE) kernels are taken as 4x the M4 per clock (ESTIMATE from
Arm's "up to 5x DSP / 15x ML uplift" Cortex-M55 claims, scaled down to what int8 convolutions
reach; not a measured figure).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from edgekiln.formats.tflite import TfliteModel
from edgekiln.targets.mcu.boards import BOARDS, Board

KERNEL_LIBRARIES = ("cmsis-nn", "reference")
# Published latencies (ms) of the MLPerf Tiny v0.5 reference submission, NUCLEO-L4R5ZI at
# 120 MHz, TFLM v2.3.1 + CMSIS-NN: 1000 / median throughput (inferences per second).
MLPERF_TINY_V05_L4R5ZI_MS = {
    "resnet8": 1000 / 1.420,  # image classification, 704.2 ms
    "ds_cnn": 1000 / 5.497,  # keyword spotting, 181.9 ms
    "mobilenet_v1_025": 1000 / 1.665,  # visual wake words, 600.6 ms
    "fc_autoencoder": 1000 / 99.487,  # anomaly detection, 10.05 ms
}
ANCHOR_CLOCK_HZ = 120_000_000
ANCHOR_WAIT_STATES = 5  # STM32L4R5 at 120 MHz (range 1 boost), RM0432 flash latency table
# Cycles per MAC on the anchor (Cortex-M4, CMSIS-NN, L4R5 flash), derived in the docstring.
M4_CMSIS_CPM = {
    "CONV_2D": MLPERF_TINY_V05_L4R5ZI_MS["resnet8"] * 1e-3 * ANCHOR_CLOCK_HZ / 12_500_992,
    "FULLY_CONNECTED": MLPERF_TINY_V05_L4R5ZI_MS["fc_autoencoder"] * 1e-3 * ANCHOR_CLOCK_HZ
    / 264_192,
}  # fmt: skip
M4_CMSIS_CPM["DEPTHWISE_CONV_2D"] = (
    MLPERF_TINY_V05_L4R5ZI_MS["ds_cnn"] * 1e-3 * ANCHOR_CLOCK_HZ
    - 2_368_000 * M4_CMSIS_CPM["CONV_2D"]
) / 288_000
REFERENCE_FACTOR = 4.6  # Lai et al. 2018: CMSIS-NN conv throughput vs plain C baseline
HELIUM_FACTOR = 4.0  # ESTIMATE: M55 MVE kernels vs M4 DSP kernels per clock (see docstring)
COREMARK_PER_MHZ = {  # Arm product pages / datasheets
    "cortex-m0plus": 2.46,
    "cortex-m4": 3.42,
    "cortex-m33": 4.02,
    "cortex-m7": 5.01,
    "cortex-m55": 4.2,
}
# Cycles per output element of the element-wise ops on an M4-class core (ESTIMATES from the
# instruction counts of the CMSIS-NN s8 loops: ADD two requantizations, pools one compare or
# add per tap, softmax an exp and a reciprocal per value).
ELEMENT_CYCLES = {
    "ADD": 12.0, "MAX_POOL_2D": 2.0, "AVERAGE_POOL_2D": 3.0, "MEAN": 2.0, "SOFTMAX": 80.0,
    "QUANTIZE": 10.0, "DEQUANTIZE": 10.0, "PAD": 1.0, "CONCATENATION": 0.5, "RESHAPE": 0.25,
}  # fmt: skip
OP_OVERHEAD_CYCLES = 1500  # TFLM Invoke dispatch + kernel set-up per operator (ESTIMATE)


@dataclass
class LayerCost:
    """One operator's estimated work and time."""

    index: int
    opcode: str
    output: str
    macs: int
    bytes_read: int
    bytes_written: int
    cycles: float
    ms: float

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return dict(self.__dict__)


def cycles_per_mac(
    core: str, kernels: str, opcode: str, wait_states: int = ANCHOR_WAIT_STATES
) -> float:
    """Estimated cycles per MAC for one op kind on one core with one kernel library.

    >>> round(cycles_per_mac("cortex-m4", "cmsis-nn", "CONV_2D"), 2)  # the anchor itself
    6.76
    >>> round(cycles_per_mac("cortex-m4", "cmsis-nn", "DEPTHWISE_CONV_2D"), 1)
    20.2
    """
    if kernels not in KERNEL_LIBRARIES:
        raise ValueError(f"kernels must be one of {KERNEL_LIBRARIES}, got {kernels!r}")
    kind = opcode if opcode in M4_CMSIS_CPM else "CONV_2D"
    flash = (wait_states - ANCHOR_WAIT_STATES) / 4.0
    base = M4_CMSIS_CPM[kind] - ANCHOR_WAIT_STATES / 4.0  # the core's share at zero wait
    base *= COREMARK_PER_MHZ["cortex-m4"] / COREMARK_PER_MHZ[core]
    if core == "cortex-m55" and kernels == "cmsis-nn":
        base = (M4_CMSIS_CPM[kind] - ANCHOR_WAIT_STATES / 4.0) / HELIUM_FACTOR
    if kernels == "reference" or core == "cortex-m0plus":
        base *= REFERENCE_FACTOR
    return max(base + ANCHOR_WAIT_STATES / 4.0 + flash, 0.25)


def flash_wait_states(board: Board) -> tuple[int, bool]:
    """The flash wait states the estimate uses for ``board``, and whether they are assumed.

    The board's own ``flash_wait_states`` come first, then those of the built-in board of the
    same name (each built-in board gives its datasheet figure); a board with neither gets the
    anchor's ``ANCHOR_WAIT_STATES`` and ``True``, assumed. An assumed figure ``k`` wait states
    off the board's real one puts every MAC of a convolution, depthwise or dense layer ``k / 4``
    cycles off.

    >>> flash_wait_states(BOARDS["rp2040"])
    (8, False)
    >>> flash_wait_states(Board("my-m4", "cortex-m4", 80_000_000, 131072, 524288))
    (5, True)
    >>> flash_wait_states(Board("my-m4", "cortex-m4", 80_000_000, 131072, 524288,
    ...                         flash_wait_states=3))
    (3, False)
    """
    if board.flash_wait_states is not None:
        return board.flash_wait_states, False
    builtin = BOARDS.get(board.name)
    if builtin is not None and builtin.flash_wait_states is not None:
        return builtin.flash_wait_states, False
    return ANCHOR_WAIT_STATES, True


def layer_costs(model: TfliteModel, board: Board, kernels: str = "cmsis-nn") -> list[LayerCost]:
    """Per-operator MACs, traffic and estimated cycles and milliseconds at the board's clock.

    A board without ``flash_wait_states`` (see ``flash_wait_states``) gets the anchor's, with
    a warning naming the board and the key that removes the assumption.
    """
    core_scale = COREMARK_PER_MHZ["cortex-m4"] / COREMARK_PER_MHZ[board.core]
    wait, assumed = flash_wait_states(board)
    if assumed:
        warnings.warn(
            f"board {board.name!r} gives no flash_wait_states: its latency estimate assumes "
            f"{ANCHOR_WAIT_STATES}, the anchor board's (nucleo-l4r5zi at 120 MHz), and each "
            "wait state more or less moves every MAC of a convolution, depthwise or dense layer "
            "by 0.25 cycles; set flash_wait_states (its datasheet's flash latency at clock_hz) "
            "in the board's [[targets.boards]] table or Board(...)",
            stacklevel=2,
        )
    out = []
    for op in model.operators:
        ins = [model.tensor(i) for i in op.inputs if i >= 0]
        y = model.tensor(op.outputs[0])
        out_elems = int(np.prod(y.shape))
        macs = _macs(op.opcode, ins, out_elems, op.options)
        read = sum(int(np.prod(t.shape)) * t.dtype.itemsize for t in ins)
        written = out_elems * y.dtype.itemsize
        cycles = float(OP_OVERHEAD_CYCLES)
        if macs:
            cycles += macs * cycles_per_mac(board.core, kernels, op.opcode, wait)
        else:
            elems = max(out_elems, int(np.prod(ins[0].shape)) if ins else 0)
            factor = 1.0 if kernels == "cmsis-nn" else 2.0  # reference loops: ~2x (estimate)
            cycles += elems * ELEMENT_CYCLES.get(op.opcode, 4.0) * core_scale * factor
        out.append(LayerCost(op.index, op.opcode, y.name, macs, read, written, cycles,
                             1000.0 * cycles / board.clock_hz))  # fmt: skip
    return out


def _macs(opcode: str, ins: list, out_elems: int, options: dict) -> int:
    if opcode == "CONV_2D" and len(ins) >= 2:
        _, kh, kw, c = ins[1].shape
        return out_elems * kh * kw * c
    if opcode == "DEPTHWISE_CONV_2D" and len(ins) >= 2:
        _, kh, kw, _ = ins[1].shape
        return out_elems * kh * kw
    if opcode == "FULLY_CONNECTED" and len(ins) >= 2:
        return out_elems * int(ins[1].shape[1])
    return 0


def estimate_ms(model: TfliteModel, board: Board, kernels: str = "cmsis-nn") -> float:
    """Total estimated milliseconds per inference."""
    return sum(c.ms for c in layer_costs(model, board, kernels))
