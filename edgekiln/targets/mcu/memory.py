"""Activation arena planning (like TFLM's GreedyMemoryPlanner) and flash accounting.

Every non-constant tensor lives from the operator that writes it (the graph input from the
first operator) to the last operator that reads it (graph outputs to the end). Scratch buffers
live for their one operator. This is TFLM's ``GreedyMemoryPlanner`` rule for rule (read in
tflite-micro's ``greedy_memory_planner.cc`` and ``micro_allocation_info.cc``): sizes are
rounded up to 16 bytes; buffers are placed largest first, each at the lowest offset that does
not overlap a placed buffer whose lifetime overlaps its own; and buffers of EQUAL size go in
the REVERSE of the order they were added (tensors by index, then scratch buffers), because
TFLM fills its sort array from the tail before a stable sort. That tie order matters: for
ResNet-8 (four 16 KB activations of one size) placing ties in tensor order packs them into
65,536 bytes, TFLM's reverse order into 51,264 bytes, which is what TFLM measures
(``print_allocations`` "head"; benchmarks/mcu_sim.py prints both for every reference model).

Scratch buffers counted (documented, per kernel library):

- reference kernels: MEAN's int32 ``temp_sum`` (4 bytes per output value), as TFLM requests;
- CMSIS-NN kernels, estimated from CMSIS-NN's ``*_get_buffer_size`` rules for DSP cores:
  CONV_2D (non-1x1) ``2 * C_in * KH * KW`` bytes (int16 im2col of two columns), DEPTHWISE_CONV_2D
  with multiplier 1 ``C * KH * KW * 2``, AVERAGE_POOL_2D ``4 * C``. FULLY_CONNECTED none.

The arena TFLM really needs adds its interpreter state to the activations (``overhead_bytes``):
tensor and node structs, per-op data (per-channel multipliers and shifts) and allocation
alignment. It is estimated here for a 32-bit MCU; TFLM on the 64-bit host measures more,
because its pointers are twice as wide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgekiln.formats.tflite import TfliteModel

ALIGNMENT = 16  # TFLM's kBufferAlignment


@dataclass(frozen=True)
class Buffer:
    """One arena buffer: a tensor or a scratch area, live from ``first`` to ``last`` op."""

    name: str
    size: int
    first: int
    last: int


@dataclass
class ArenaPlan:
    """Offsets for every buffer and the peak (planned arena bytes)."""

    offsets: dict[str, int]
    buffers: list[Buffer]
    peak_bytes: int
    live_bytes_per_op: list[int] = field(default_factory=list)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def plan_arena(buffers: list[Buffer], num_ops: int | None = None) -> ArenaPlan:
    """Greedy by size, first fit into offsets, as TFLM's GreedyMemoryPlanner.

    ``buffers`` come in the order TFLM adds them (tensor index order, then scratch buffers):
    equal sizes are placed last-added first.

    >>> bufs = [Buffer("a", 100, 0, 0), Buffer("b", 50, 1, 1), Buffer("c", 30, 0, 1)]
    >>> plan_arena(bufs).peak_bytes
    144
    """
    indexed = sorted(enumerate(buffers), key=lambda kb: (-_align(kb[1].size), -kb[0]))
    order = [b for _, b in indexed]
    placed: list[tuple[int, int, Buffer]] = []  # (offset, aligned size, buffer)
    offsets: dict[str, int] = {}
    for buf in order:
        size = _align(buf.size)
        clashes = sorted(
            (off, sz)
            for off, sz, other in placed
            if other.first <= buf.last and buf.first <= other.last
        )
        offset = 0
        for off, sz in clashes:
            if offset + size <= off:
                break
            offset = max(offset, off + sz)
        placed.append((offset, size, buf))
        offsets[buf.name] = offset
    peak = max((off + sz for off, sz, _ in placed), default=0)
    n = num_ops if num_ops is not None else max((b.last for b in buffers), default=-1) + 1
    live = [sum(_align(b.size) for b in buffers if b.first <= i <= b.last) for i in range(n)]
    return ArenaPlan(offsets, list(buffers), peak, live)


def tensor_buffers(model: TfliteModel) -> list[Buffer]:
    """One buffer per activation tensor with its lifetime over the operator order, in tensor
    index order (the order TFLM adds them to its planner)."""
    n = len(model.operators)
    first: dict[int, int] = {i: 0 for i in model.inputs}
    last: dict[int, int] = {i: 0 for i in model.inputs}
    for k, op in enumerate(model.operators):
        for i in op.inputs:
            if i >= 0 and model.tensor(i).data is None:
                first.setdefault(i, k)
                last[i] = k
        for i in op.outputs:
            first.setdefault(i, k)
            last[i] = max(last.get(i, k), k)
    for i in model.outputs:
        last[i] = n - 1
    out = []
    for i in sorted(first):
        t = model.tensor(i)
        size = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        out.append(Buffer(f"{i}:{t.name}", size, first[i], last[i]))
    return out


def scratch_buffers(model: TfliteModel, kernels: str) -> list[Buffer]:
    """Scratch areas the kernels request (see the module docstring for the rules)."""
    out = []
    for k, op in enumerate(model.operators):
        size = 0
        if op.opcode == "MEAN" and kernels == "reference":
            size = 4 * int(np.prod(model.tensor(op.outputs[0]).shape))
        elif kernels == "cmsis-nn" and op.opcode == "CONV_2D":
            _, kh, kw, c = model.tensor(op.inputs[1]).shape
            size = 0 if (kh, kw) == (1, 1) else 2 * c * kh * kw
        elif kernels == "cmsis-nn" and op.opcode == "DEPTHWISE_CONV_2D":
            _, kh, kw, c = model.tensor(op.inputs[1]).shape
            size = 2 * c * kh * kw if int(op.options.get("depth_multiplier", 1)) == 1 else 0
        elif kernels == "cmsis-nn" and op.opcode == "AVERAGE_POOL_2D":
            size = 4 * int(model.tensor(op.inputs[0]).shape[-1])
        elif kernels == "cmsis-nn" and op.opcode == "MEAN":
            size = 4 * int(np.prod(model.tensor(op.outputs[0]).shape))
        if size:
            out.append(Buffer(f"scratch:{k}:{op.opcode}", size, k, k))
    return out


def interpreter_overhead_bytes(model: TfliteModel) -> int:
    """Estimated TFLM persistent arena use on a 32-bit MCU (structs and per-op data).

    TfLiteEvalTensor 12 B per tensor; node + registration 40 B per op; per-op data 64 B plus
    8 B per output channel for per-channel kernels (multiplier and shift); 16 B per dims array;
    a fixed ~512 B for the subgraph, allocator and scratch handles. An estimate, not a count.
    """
    total = 512 + 12 * len(model.tensors)
    for op in model.operators:
        total += 40 + 64 + 16 * (len(op.inputs) + len(op.outputs))
        if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            total += 8 * int(model.tensor(op.outputs[0]).shape[-1])
    return _align(total)


@dataclass
class MemoryReport:
    """Arena and flash figures for one model and kernel library."""

    arena_bytes: int  # planned activations + scratch (peak)
    activation_bytes: int  # planned activations alone
    scratch_bytes: int  # largest scratch buffer
    overhead_bytes: int  # estimated TFLM interpreter state
    arena_total_bytes: int  # arena_bytes + overhead_bytes: what to give TFLM
    file_bytes: int  # .tflite size (graph + constants): upper bound of model flash
    constant_bytes: int  # weights and biases alone
    runtime_code_bytes: int  # estimate, see latency.RUNTIME_CODE_BYTES
    flash_bytes: int  # file_bytes + runtime_code_bytes
    largest_tensor: str  # the largest activation
    largest_tensor_bytes: int
    peak_op: int  # operator index where the live activations peak
    live_bytes_per_op: list[int]
    largest_constant: str  # the largest weight or bias tensor ("-" when there is none)
    largest_constant_bytes: int
    largest_constant_op: int  # index of the first operator that reads it (-1: none)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return dict(self.__dict__)


# Estimated TFLM code size (bytes, Cortex-M, -Os) per kernel, plus the interpreter core. These
# are ESTIMATES read off public TFLM size reports (the interpreter core is ~20-30 KB in TFLM's
# own "memory footprint" benchmarks of the keyword model; single reference kernels 1-4 KB, CMSIS-NN
# variants a little larger). They are not measured by edgekiln.
RUNTIME_CORE_BYTES = 24 * 1024
KERNEL_CODE_BYTES = {
    "CONV_2D": 4096, "DEPTHWISE_CONV_2D": 4096, "FULLY_CONNECTED": 2048, "ADD": 2048,
    "MAX_POOL_2D": 1536, "AVERAGE_POOL_2D": 1536, "MEAN": 2048, "RESHAPE": 512,
    "CONCATENATION": 1536, "SOFTMAX": 2560, "PAD": 1536, "QUANTIZE": 1536, "DEQUANTIZE": 1024,
}  # fmt: skip


def runtime_code_bytes(model: TfliteModel) -> int:
    """Estimated TFLM code size for the model's op set (interpreter core + one kernel each)."""
    return RUNTIME_CORE_BYTES + sum(KERNEL_CODE_BYTES.get(op, 2048) for op in model.opcodes())


def memory_report(model: TfliteModel, kernels: str = "cmsis-nn") -> MemoryReport:
    """Plan the arena and count flash for ``model`` with the given kernel library."""
    tensors = tensor_buffers(model)
    scratch = scratch_buffers(model, kernels)
    n = len(model.operators)
    act = plan_arena(tensors, n)
    full = plan_arena(tensors + scratch, n)
    overhead = interpreter_overhead_bytes(model)
    constant = sum(int(t.data.nbytes) for t in model.tensors if t.data is not None)
    largest = max(tensors, key=lambda b: b.size, default=Buffer("-", 0, 0, 0))
    code = runtime_code_bytes(model)
    peak_op = int(np.argmax(full.live_bytes_per_op)) if full.live_bytes_per_op else 0
    big, big_bytes, big_op = _largest_constant(model)
    return MemoryReport(
        arena_bytes=full.peak_bytes,
        activation_bytes=act.peak_bytes,
        scratch_bytes=max((b.size for b in scratch), default=0),
        overhead_bytes=overhead,
        arena_total_bytes=full.peak_bytes + overhead,
        file_bytes=int(model.size_bytes),
        constant_bytes=constant,
        runtime_code_bytes=code,
        flash_bytes=int(model.size_bytes) + code,
        largest_tensor=largest.name.split(":", 1)[-1],
        largest_tensor_bytes=largest.size,
        peak_op=peak_op,
        live_bytes_per_op=full.live_bytes_per_op,
        largest_constant=big,
        largest_constant_bytes=big_bytes,
        largest_constant_op=big_op,
    )


def _largest_constant(model: TfliteModel) -> tuple[str, int, int]:
    """Name and bytes of the largest constant tensor (the first of equal ones) and the index of
    the first operator that reads it; ("-", 0, -1) when the model has no constant."""
    constants = [(int(t.data.nbytes), t) for t in model.tensors if t.data is not None]
    if not constants:
        return "-", 0, -1
    nbytes, big = max(constants, key=lambda c: c[0])  # max keeps the first of equal sizes
    readers = (k for k, op in enumerate(model.operators) if big.index in op.inputs)
    return big.name, nbytes, next(readers, -1)
