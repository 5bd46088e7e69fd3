"""Fixed-point primitives, boards, arena planner, comparison and simulator error handling."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from edgekiln.targets.mcu import boards, compare, fixedpoint, latency, memory
from edgekiln.targets.mcu import fixedpoint as fp
from edgekiln.targets.mcu.boards import Board, get_board
from edgekiln.targets.mcu.interpreter import SimulationError, simulate
from edgekiln.targets.mcu.memory import Buffer, plan_arena
from tests.targets.mcu import cases

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


@pytest.mark.parametrize("module", [fixedpoint, boards, compare, latency, memory])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_srdhm_saturates_only_int32_min_squared_and_rounds_ties_up():
    assert fp.saturating_rounding_doubling_high_mul(I32_MIN, I32_MIN) == I32_MAX
    assert fp.saturating_rounding_doubling_high_mul(I32_MIN, I32_MAX) == -I32_MAX
    assert fp.saturating_rounding_doubling_high_mul(-3, 1 << 30) == -1  # -1.5 rounds up
    assert fp.saturating_rounding_doubling_high_mul(3, 1 << 30) == 2  # 1.5 rounds up


def test_rounding_divide_by_pot_ties_go_away_from_zero():
    x = np.array([1, -1, 3, -3, 2, -2, 6, -6])
    assert fp.rounding_divide_by_pot(x, 1).tolist() == [1, -1, 2, -2, 1, -1, 3, -3]
    assert fp.rounding_divide_by_pot(np.array([I32_MIN]), 31).tolist() == [-1]


def test_quantize_multiplier_edges():
    assert fp.quantize_multiplier(0.0) == (0, 0)
    assert fp.quantize_multiplier(1.0) == (1 << 30, 1)
    assert fp.quantize_multiplier(2.0**-40) == (0, 0)  # below 2**-31 collapses, as TFLite
    m, s = fp.quantize_multiplier(0.999999999999)
    assert m == 1 << 30 and s == 1  # rounding up to 2**31 renormalises


def test_multiply_by_quantized_multiplier_negative_shift_and_single_rounding():
    x = np.array([100, -100, 7, -7])
    m, s = fp.quantize_multiplier(0.25)
    assert fp.multiply_by_quantized_multiplier(x, m, s).tolist() == [25, -25, 2, -2]
    # 7 * 0.375 = 2.625: both roundings give 3; -2.5 ties differ between the variants
    m, s = fp.quantize_multiplier(0.3125)
    double = fp.multiply_by_quantized_multiplier(np.array([-8]), m, s, "double")
    single = fp.multiply_by_quantized_multiplier(np.array([-8]), m, s, "single")
    assert double.tolist() == [-3] and single.tolist() == [-2]


def test_board_table_and_user_boards():
    assert get_board("mcu:STM32H743").clock_hz == 480_000_000
    assert {b.core for b in boards.BOARDS.values()} == set(boards.CORES)
    assert all(b.source for b in boards.BOARDS.values())
    with pytest.raises(ValueError, match=r"board key 'clock_hz' = -5 is invalid: it must be a pos"):
        Board.from_dict({"name": "x", "core": "cortex-m4", "clock_hz": -5, "sram_bytes": 1,
                         "flash_bytes": 1})  # fmt: skip
    with pytest.raises(ValueError, match="'ram' are not known"):
        Board.from_dict({"name": "x", "ram": 3})
    with pytest.raises(ValueError, match="board key 'core' = 'z80' is invalid"):
        Board("x", "z80", 1, 1, 1)


def test_planner_reuses_memory_of_dead_tensors():
    chain = [Buffer(f"t{i}", 1000, i, i + 1) for i in range(6)]
    plan = plan_arena(chain)
    assert plan.peak_bytes == 2 * 1008  # two live at a time, 16-byte aligned
    starts = {(plan.offsets[b.name], plan.offsets[b.name] + 1008) for b in chain}
    assert len(starts) == 2


def test_unsupported_op_names_opcode_and_supported_set():
    from tests.targets.mcu._tfl import INT8, B, Net

    n = Net()
    x = n.act((1, 4), 0.1, 0)
    y = n.act((1, 4), 0.1, 0)
    n.op(B.TANH, [x], [y])
    data = n.build([x], [y])
    with pytest.raises(SimulationError, match=r"does not support TANH; it supports ADD, "):
        simulate(data, np.zeros((1, 4), np.int8))
    assert INT8 == 9


def test_hostile_inputs_raise_clear_errors():
    data, x = cases.build_cases()["conv_same_s2_relu"]
    with pytest.raises(ValueError, match="is int8; got float64 data"):
        simulate(data, x.astype(np.float64))
    with pytest.raises(ValueError, match=r"has shape \(1, 9, 9, 3\)"):
        simulate(data, x[:, :5])
    with pytest.raises(ValueError):  # not a flatbuffer at all
        simulate(b"TFL3garbage" * 3, x)
    corrupted = bytearray(data)
    rng = np.random.default_rng(0)
    for _ in range(30):  # bit flips: a clear ValueError or a result, never a crash
        c = bytearray(corrupted)
        c[int(rng.integers(8, len(c)))] ^= 0xFF
        try:
            simulate(bytes(c), x)
        except ValueError:
            pass


def test_planner_places_equal_sizes_last_added_first_like_tflm():
    # ResNet-8's first stage: four 16 KB activations of one size plus an 18 KB PAD output.
    # TFLM fills its sort array from the tail, so equal sizes go last-added first: 51,264 B
    # (TFLM's measured head). Tensor order would give 65,536 B.
    bufs = [Buffer("t1", 16384, 0, 3), Buffer("t4", 16384, 1, 2), Buffer("t7", 16384, 2, 3),
            Buffer("t10", 16384, 3, 7), Buffer("t12", 18496, 4, 5)]  # fmt: skip
    plan = plan_arena(bufs)
    assert plan.peak_bytes == 51264
    assert plan.offsets == {"t12": 0, "t10": 18496, "t7": 0, "t4": 16384, "t1": 34880}


def test_target_catalog_lists_runtimes_and_every_board():
    from edgekiln.targets import catalog

    assert doctest.testmod(catalog).failed == 0
    targets = catalog.list_targets()
    names = [t.name for t in targets]
    assert names[:3] == ["onnxruntime", "litert", "tflm"]
    assert {f"mcu:{b}" for b in boards.BOARDS} <= set(names)
    for t in targets:
        assert t.description and "\n" not in t.description
        if t.kind == "mcu":
            assert t.core and t.clock_hz and t.sram_bytes and t.flash_bytes and t.source
    with pytest.raises(ValueError, match=r"unknown target 'mcu:esp32'; known targets: onnx"):
        catalog.get_target_info("mcu:esp32")


def test_board_sram_is_the_largest_contiguous_region():
    # an arena is one contiguous block: split RAM counts its largest region only
    assert get_board("stm32h743").sram_bytes == 512 * 1024  # AXI SRAM of 1 MB total
    assert get_board("stm32u575").sram_bytes == 768 * 1024  # SRAM1-3 of 786 KB total
    assert get_board("nucleo-l4r5zi").sram_bytes == 640 * 1024
