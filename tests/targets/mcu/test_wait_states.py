"""Flash wait states: every board can give them, the latency model uses them, and an estimate
that had to assume them says so (in ``details`` and as a warning)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from edgekiln.exporters.tflite import write_tflite
from edgekiln.formats.tflite import read_tflite
from edgekiln.targets.mcu import Board, run_mcu
from edgekiln.targets.mcu.boards import BOARDS, MAX_FLASH_WAIT_STATES
from edgekiln.targets.mcu.latency import (
    ANCHOR_WAIT_STATES,
    OP_OVERHEAD_CYCLES,
    cycles_per_mac,
    flash_wait_states,
    layer_costs,
)
from tests.targets.mcu import graphs

MINE = {
    "name": "mine",
    "core": "cortex-m4",
    "clock_hz": 80_000_000,
    "sram_bytes": 1 << 20,
    "flash_bytes": 1 << 21,
}
RULE = (
    "it must be a whole number from 0 to 15 (the CPU cycles a flash read waits at clock_hz, "
    "from the part's flash latency table; a 4-bit latency field holds no more), or left out, "
    "in which case the latency estimate assumes the anchor board's and says so"
)
ASSUMED = (
    "board 'mine' gives no flash_wait_states: its latency estimate assumes 5, the anchor "
    "board's (nucleo-l4r5zi at 120 MHz), and each wait state more or less moves every MAC of a "
    "convolution, depthwise or dense layer by 0.25 cycles; set flash_wait_states (its "
    "datasheet's flash latency at clock_hz) in the board's [[targets.boards]] table or "
    "Board(...)"
)


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    return write_tflite(graphs.every_op_cnn(), tmp_path_factory.mktemp("wait") / "cnn.tflite")


def test_builtin_boards_carry_their_datasheet_wait_states():
    # the figures latency.py's table held before they moved onto the boards
    assert {name: b.flash_wait_states for name, b in BOARDS.items()} == {
        "nucleo-l4r5zi": 5, "nrf52840": 2, "stm32h743": 4, "stm32u575": 4, "rp2040": 8,
        "alif-e7-hp": 2,
    }  # fmt: skip
    assert BOARDS["nucleo-l4r5zi"].flash_wait_states == ANCHOR_WAIT_STATES  # the anchor's own
    assert all(flash_wait_states(b) == (b.flash_wait_states, False) for b in BOARDS.values())


@pytest.mark.parametrize("wait", [0, MAX_FLASH_WAIT_STATES])
def test_a_user_board_takes_wait_states_from_its_table(wait):
    board = Board.from_dict({**MINE, "flash_wait_states": wait})
    assert board.flash_wait_states == wait
    assert flash_wait_states(board) == (wait, False)


@pytest.mark.parametrize("value", [-1, 16, True, 2.0, "3"])
def test_bad_wait_states_name_the_key_the_value_and_the_range(value):
    message = f"board key 'flash_wait_states' = {value!r} is invalid: {RULE}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Board.from_dict({**MINE, "flash_wait_states": value})


def test_the_estimate_uses_the_boards_wait_states(cnn_path):
    # Before, every user board was estimated at the anchor's 5 whatever it gave.
    model = read_tflite(cnn_path)
    for wait in (0, 3, 12):
        costs = layer_costs(model, Board.from_dict({**MINE, "flash_wait_states": wait}))
        conv = next(c for c in costs if c.opcode == "CONV_2D")
        per_mac = cycles_per_mac("cortex-m4", "cmsis-nn", "CONV_2D", wait)
        assert conv.cycles == pytest.approx(OP_OVERHEAD_CYCLES + conv.macs * per_mac)
    slow = layer_costs(model, Board.from_dict({**MINE, "flash_wait_states": 12}))
    fast = layer_costs(model, Board.from_dict({**MINE, "flash_wait_states": 0}))
    # 12 wait states more cost 12 / 4 = 3 cycles per MAC (one 32-bit weight load per 4 MACs);
    # the element-wise ops read no weights and do not move
    extra = sum(s.cycles - f.cycles for s, f in zip(slow, fast, strict=True))
    assert extra == pytest.approx(3.0 * sum(c.macs for c in slow))


def test_assumed_wait_states_are_flagged_in_details_and_warned(cnn_path):
    x = np.zeros((2, 3, 12, 12), np.float32)
    with pytest.warns(UserWarning, match=f"^{re.escape(ASSUMED)}$"):
        r = run_mcu(cnn_path, x, board=Board.from_dict(MINE))
    assert r.ok, r.error
    assert r.details["flash_wait_states"] == ANCHOR_WAIT_STATES
    assert r.details["flash_wait_states_assumed"] is True
    assert r.details["board"]["flash_wait_states"] is None  # the board gave none

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a board that gives them warns of nothing
        given = run_mcu(cnn_path, x, board=Board.from_dict({**MINE, "flash_wait_states": 1}))
        builtin = run_mcu(cnn_path, x, board="rp2040")
    assert given.details["flash_wait_states"] == 1
    assert given.details["flash_wait_states_assumed"] is False
    assert builtin.details["flash_wait_states"] == 8
    assert builtin.details["flash_wait_states_assumed"] is False
    assert given.latency.median_ms < r.latency.median_ms  # 1 wait state is faster than 5


def test_a_user_board_named_like_a_builtin_one_keeps_its_wait_states():
    # a recipe may redefine a built-in board (say with less SRAM); without wait states of its
    # own it keeps the built-in board's datasheet figure, which is not an assumption
    board = Board("rp2040", "cortex-m0plus", 133_000_000, 128 * 1024, 1 << 21)
    assert flash_wait_states(board) == (8, False)


def test_the_report_entry_keeps_the_flags(cnn_path):
    # details are free-form in the schema; the report's board object keeps its five keys
    from edgekiln.validate import target_entry

    with pytest.warns(UserWarning, match="gives no flash_wait_states"):
        r = run_mcu(cnn_path, np.zeros((1, 3, 12, 12), np.float32), board=Board.from_dict(MINE))
    entry = target_entry(r, str(cnn_path))
    assert entry["details"]["flash_wait_states"] == 5
    assert entry["details"]["flash_wait_states_assumed"] is True
    assert set(entry["board"]) == {"name", "core", "clock_hz", "sram_bytes", "flash_bytes"}
