"""Microcontroller board profiles: core, clock, SRAM, flash and flash wait states, each figure
with its source.

``get_board("nucleo-l4r5zi")`` returns a frozen ``Board``; ``Board.from_dict`` builds a user's
own board from a recipe table and names the key, value and rule of anything wrong.

>>> b = get_board("mcu:nrf52840")
>>> b.core, b.clock_hz, b.sram_bytes // 1024, b.flash_wait_states
('cortex-m4', 64000000, 256, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

KB = 1024
MB = 1024 * 1024

# Core families the latency model knows (see latency.py).
CORES = ("cortex-m0plus", "cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55")
# The most flash wait states a board may give: what the 4-bit FLASH_ACR LATENCY field of the
# STM32L4+ and STM32U5 holds (RM0432, RM0456). A cached external flash (rp2040) gives its
# average cost per access, within the same range.
MAX_FLASH_WAIT_STATES = 15


@dataclass(frozen=True)
class Board:
    """One board or part. ``sram_bytes`` is the RAM TFLM's arena may use; ``flash_bytes`` the
    non-volatile memory for the model and the code; ``flash_wait_states`` the CPU cycles a
    flash read waits at ``clock_hz`` (the datasheet's flash latency, 0 to 15), or None when not
    known: the latency model then assumes its anchor board's and says so in its result."""

    name: str
    core: str
    clock_hz: int
    sram_bytes: int
    flash_bytes: int
    source: str = "user-defined"
    notes: str = ""
    flash_wait_states: int | None = None

    def __post_init__(self) -> None:
        _check_field("name", self.name, isinstance(self.name, str) and bool(self.name),
                     "a non-empty string")  # fmt: skip
        _check_field("core", self.core, self.core in CORES, f"one of {', '.join(CORES)}")
        for key in ("clock_hz", "sram_bytes", "flash_bytes"):
            value = getattr(self, key)
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            _check_field(key, value, ok, "a positive integer")
        wait = self.flash_wait_states
        ok = wait is None or (
            isinstance(wait, int)
            and not isinstance(wait, bool)
            and 0 <= wait <= MAX_FLASH_WAIT_STATES
        )
        _check_field(
            "flash_wait_states",
            wait,
            ok,
            f"a whole number from 0 to {MAX_FLASH_WAIT_STATES} (the CPU cycles a flash read "
            "waits at clock_hz, from the part's flash latency table; a 4-bit latency field holds "
            "no more), or left out, in which case the latency estimate assumes the anchor "
            "board's and says so",
        )

    @property
    def target(self) -> str:
        """The target name, ``mcu:<board>``."""
        return f"mcu:{self.name}"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Board:
        """A user-defined board from a recipe table (unknown keys are errors, not ignored).

        >>> Board.from_dict({"name": "my-m4", "core": "cortex-m4", "clock_hz": 80_000_000,
        ...                  "sram_bytes": 131072, "flash_bytes": 524288}).target
        'mcu:my-m4'
        >>> Board.from_dict({"name": "my-m4", "core": "cortex-m4", "clock_hz": 80_000_000,
        ...                  "sram_bytes": 131072, "flash_bytes": 524288,
        ...                  "flash_wait_states": 4}).flash_wait_states
        4
        """
        if not isinstance(d, dict):
            raise ValueError(f"a board must be a table of keys, got {type(d).__name__}")
        known = {f.name for f in fields(Board)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"board key(s) {', '.join(map(repr, unknown))} are not known; "
                f"a board has {', '.join(sorted(known))}"
            )
        missing = [
            k for k in ("name", "core", "clock_hz", "sram_bytes", "flash_bytes") if k not in d
        ]
        if missing:
            raise ValueError(f"board {d.get('name', '?')!r} lacks key(s) {', '.join(missing)}")
        return Board(**d)


def _check_field(key: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"board key {key!r} = {value!r} is invalid: it must be {rule}")


BOARDS: dict[str, Board] = {
    b.name: b
    for b in (
        Board(
            "nucleo-l4r5zi", "cortex-m4", 120_000_000, 640 * KB, 2 * MB,
            source="ST DS12023 'STM32L4R5xx STM32L4R7xx STM32L4S5xx STM32L4S7xx' datasheet and "
            "RM0432 (120 MHz Cortex-M4F; 2 MB flash; 640 KB SRAM = SRAM1 192 KB + SRAM2 64 KB + "
            "SRAM3 384 KB, one contiguous block from 0x20000000); MLPerf Tiny v0.5 reference "
            "system description (mlcommons/tiny_results_v0.5, Nucleo_L4R5ZI_System_Description"
            ".json: STM32L4R5ZIT6, 640KB SRAM, 2MB eFlash, 120 MHz)",
            notes="Cortex-M4F with FPU; the MLPerf Tiny v0.5/v1.0 reference board",
            flash_wait_states=5,  # STM32L4R5 at 120 MHz, range 1 boost: 5 WS (RM0432)
        ),
        Board(
            "nrf52840", "cortex-m4", 64_000_000, 256 * KB, 1 * MB,
            source="Nordic 'nRF52840 Product Specification' v1.7 (64 MHz Cortex-M4F, 1 MB flash, "
            "256 KB RAM in one block from 0x20000000)",
            flash_wait_states=2,  # 64 MHz with cache enabled: ~2 WS average on misses (ESTIMATE)
        ),
        Board(
            "stm32h743", "cortex-m7", 480_000_000, 512 * KB, 2 * MB,
            source="ST DS12110 'STM32H742xI/G STM32H743xI/G' datasheet and RM0433 (480 MHz; 2 MB "
            "flash; 1 MB of RAM in separate regions: ITCM 64 KB, DTCM 128 KB, AXI SRAM 512 KB, "
            "SRAM1-3 288 KB, SRAM4 64 KB)",
            notes="sram_bytes is the AXI SRAM (D1 domain), the largest contiguous region an "
            "arena can occupy; the 1 MB total is split across address ranges",
            flash_wait_states=4,  # 480 MHz AXI flash: 4 WS (partly hidden by the M7 caches)
        ),
        Board(
            "stm32u575", "cortex-m33", 160_000_000, 768 * KB, 2 * MB,
            source="ST DS13737 'STM32U575xx' datasheet and RM0456 (160 MHz Cortex-M33; 2 MB flash; "
            "786 KB SRAM: SRAM1 192 KB + SRAM2 64 KB + SRAM3 512 KB contiguous from 0x20000000, "
            "SRAM4 16 KB at 0x28000000, 2 KB backup SRAM)",
            notes="sram_bytes is SRAM1-3 (768 KB), the largest contiguous region; the product "
            "figure 786 KB counts SRAM4 and the backup SRAM",
            flash_wait_states=4,  # 160 MHz: 4 WS
        ),
        Board(
            "rp2040", "cortex-m0plus", 133_000_000, 264 * KB, 2 * MB,
            source="Raspberry Pi 'RP2040 Datasheet' (dual Cortex-M0+ 133 MHz, 264 KB SRAM in one "
            "address range: four striped 64 KB banks + two 4 KB banks; no internal flash); "
            "'Raspberry Pi Pico Datasheet' (2 MB W25Q16JV QSPI flash)",
            notes="flash is external QSPI executed in place through a 16 KB cache; one core is "
            "modelled",
            # XIP QSPI through a 16 KB cache: misses cost tens of cycles (ESTIMATE)
            flash_wait_states=8,
        ),
        Board(
            "alif-e7-hp", "cortex-m55", 400_000_000, 1 * MB, 5632 * KB,
            source="Alif whitepaper 'RAM Regions and Linker Files in Alif Microcontrollers' "
            "(RTSS-HP M55 at 400 MHz: SRAM2 256 KB ITCM, SRAM3 1024 KB DTCM at 400 MHz); Alif "
            "'Ensemble E7' product brief (up to 5.5 MB MRAM)",
            notes="sram_bytes is the HP core's 1 MB DTCM; 6.5 MB of bulk SRAM0/1 is also "
            "reachable at 400 MHz (Rev B) but slower; the Ethos-U55 NPU is not modelled",
            flash_wait_states=2,  # MRAM at 400 MHz through the HP core's bus (ESTIMATE)
        ),
    )
}  # fmt: skip


def get_board(name: str | Board) -> Board:
    """The board called ``name`` (``mcu:`` prefix optional, case-insensitive)."""
    if isinstance(name, Board):
        return name
    key = str(name).strip().lower().removeprefix("mcu:")
    if key not in BOARDS:
        raise ValueError(
            f"unknown board {name!r}; known boards: {', '.join(sorted(BOARDS))}. "
            "Define your own with Board.from_dict({...})"
        )
    return BOARDS[key]
