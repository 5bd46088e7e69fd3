"""A per-layer latency model for TFLM on Cortex-M cores, from public measurements.

Each layer costs ``MACs x cycles_per_MAC`` (per op kind, core family and kernel library), plus
flash wait states on weight fetches, plus ``elements x cycles_per_element`` for the
element-wise ops, plus a fixed TFLM dispatch cost per operator. The result is an ESTIMATE
(``Latency(estimated=True)``); every coefficient names its source and derivation below.

Derivation of the cycles-per-MAC anchor (CMSIS-NN, Cortex-M7): Lai, Suda and Chandra,
"CMSIS-NN: Efficient Neural Network Kernels for Arm Cortex-M CPUs", arXiv:1801.06601 (2018):
their CIFAR-10 CNN (conv 5x5x3x32 @32x32, 5x5x32x32 @16x16, 5x5x32x64 @8x8, pools, FC: 12.3 M
MACs) runs at 10.1 images/s on a 216 MHz Cortex-M7 (STM32F746): 99 ms = 21.4 M cycles, i.e.
1.74 cycles/MAC for the whole network. The same paper reports 4.6x throughput for CMSIS-NN
convolutions over the plain-C baseline, which gives the reference-kernel factor.

Other cores scale from the M7 anchor by Arm's published CoreMark/MHz (Cortex-M0+ 2.46,
M4 3.42, M33 4.02, M7 5.01, M55 4.2) for integer code; M0+ has no DSP (SMLAD) instructions, so
CMSIS-NN falls back to plain C there (reference factor applies). For M55 the Helium (MVE)
kernels are taken as 4x the M4 per clock (estimate from Arm's "up to 5x DSP / 15x ML uplift"
Cortex-M55 claims, scaled down to what int8 convolutions reach; not a measured figure).

Flash: weights stream from flash; each 32-bit weight load pays the board's flash wait states
(datasheet figures in ``FLASH_WAIT_STATES``), i.e. ``wait_states / 4`` cycles per MAC.

Sanity check (see tests and benchmarks/mcu_sim.py): MLPerf Tiny v0.5 reference submission,
TFLM + CMSIS-NN on NUCLEO-L4R5ZI at 120 MHz, image classification (ResNet-8, ~12.5 M MACs):
704 ms as recalled from the MLPerf Tiny paper (Banbury et al., NeurIPS 2021 Datasets and
Benchmarks) results table; the model's estimate for a ResNet-8 of that shape is within 2x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekiln.formats.tflite import TfliteModel
from edgekiln.targets.mcu.boards import Board

KERNEL_LIBRARIES = ("cmsis-nn", "reference")
M7_CMSIS_CONV_CPM = 1.74  # Lai et al. 2018, see module docstring
REFERENCE_FACTOR = 4.6  # Lai et al. 2018: CMSIS-NN conv throughput vs plain C baseline
COREMARK_PER_MHZ = {  # Arm product pages / datasheets
    "cortex-m0plus": 2.46,
    "cortex-m4": 3.42,
    "cortex-m33": 4.02,
    "cortex-m7": 5.01,
    "cortex-m55": 4.2,
}
# Per-op-kind multiplier on the conv cycles/MAC (estimates): depthwise convolutions reuse
# nothing across channels in CMSIS-NN's s8 kernels (about 2x a conv per MAC); fully connected
# layers are a plain SMLAD dot product without im2col (about 0.7x).
KIND_FACTOR = {"CONV_2D": 1.0, "DEPTHWISE_CONV_2D": 2.0, "FULLY_CONNECTED": 0.7}
# Cycles per output element of the element-wise ops on an M4-class core (estimates from the
# instruction counts of the CMSIS-NN s8 loops: ADD two requantizations, pools one compare or
# add per tap, softmax an exp and a reciprocal per value).
ELEMENT_CYCLES = {
    "ADD": 12.0, "MAX_POOL_2D": 2.0, "AVERAGE_POOL_2D": 3.0, "MEAN": 2.0, "SOFTMAX": 80.0,
    "QUANTIZE": 10.0, "DEQUANTIZE": 10.0, "PAD": 1.0, "CONCATENATION": 0.5, "RESHAPE": 0.25,
}  # fmt: skip
OP_OVERHEAD_CYCLES = 1500  # TFLM Invoke dispatch + kernel set-up per operator (estimate)
# Flash wait states at the listed clock (datasheets named in boards.py).
FLASH_WAIT_STATES = {
    "nucleo-l4r5zi": 5,  # STM32L4R5 at 120 MHz, range 1 boost: 5 WS
    "nrf52840": 2,  # nRF52840 64 MHz with cache enabled: ~2 WS average on misses (estimate)
    "stm32h743": 4,  # 480 MHz AXI flash: 4 WS (partly hidden by the M7 caches)
    "stm32u575": 4,  # 160 MHz: 4 WS
    "rp2040": 8,  # XIP QSPI through a 16 KB cache: misses cost tens of cycles (estimate)
    "alif-e7-hp": 2,  # MRAM at 400 MHz through the HP core's bus (estimate)
}


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


def cycles_per_mac(core: str, kernels: str, opcode: str) -> float:
    """Estimated cycles per MAC for one op kind on one core with one kernel library.

    >>> round(cycles_per_mac("cortex-m7", "cmsis-nn", "CONV_2D"), 2)
    1.74
    """
    if kernels not in KERNEL_LIBRARIES:
        raise ValueError(f"kernels must be one of {KERNEL_LIBRARIES}, got {kernels!r}")
    base = M7_CMSIS_CONV_CPM * COREMARK_PER_MHZ["cortex-m7"] / COREMARK_PER_MHZ[core]
    if core == "cortex-m55" and kernels == "cmsis-nn":
        base = cycles_per_mac("cortex-m4", "cmsis-nn", "CONV_2D") / 4.0
    if kernels == "reference" or core == "cortex-m0plus":
        base *= REFERENCE_FACTOR
    return base * KIND_FACTOR.get(opcode, 1.0)


def layer_costs(model: TfliteModel, board: Board, kernels: str = "cmsis-nn") -> list[LayerCost]:
    """Per-operator MACs, traffic and estimated cycles and milliseconds at the board's clock."""
    core_scale = COREMARK_PER_MHZ["cortex-m4"] / COREMARK_PER_MHZ[board.core]
    wait = FLASH_WAIT_STATES.get(board.name, 2)
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
            cycles += macs * cycles_per_mac(board.core, kernels, op.opcode) + macs * wait / 4.0
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
