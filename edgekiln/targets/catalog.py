"""Every target name the CLI accepts, with a one-line description (``edgekiln targets``).

CPU runtimes: ``onnxruntime``, ``litert``, ``tflm``. Microcontroller boards: ``mcu:<board>``
for each profile in ``edgekiln.targets.mcu.boards.BOARDS``, with core, clock, SRAM, flash and
the documents the figures come from.

>>> names = [t.name for t in list_targets()]
>>> names[:3], "mcu:nucleo-l4r5zi" in names
(['onnxruntime', 'litert', 'tflm'], True)
>>> t = get_target_info("mcu:nrf52840")
>>> t.core, t.clock_hz, t.sram_bytes, t.flash_bytes
('cortex-m4', 64000000, 262144, 1048576)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgekiln.targets.mcu.boards import BOARDS

RUNTIMES = {
    "onnxruntime": "int8 ONNX (QDQ) on ONNX Runtime's CPU provider, exact int8 x int8 kernels",
    "litert": "int8 TFLite on LiteRT (XNNPACK or reference kernels) on the host CPU",
    "tflm": "int8 TFLite on TensorFlow Lite Micro's own kernels on the host; measured arena",
}


@dataclass(frozen=True)
class TargetInfo:
    """One target: its CLI name, what it is, and for boards the hardware figures.

    ``kind`` is ``"runtime"`` or ``"mcu"``; the board fields are None for runtimes.
    """

    name: str
    kind: str
    description: str
    core: str | None = None
    clock_hz: int | None = None
    sram_bytes: int | None = None
    flash_bytes: int | None = None
    source: str | None = None
    flash_wait_states: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def list_targets() -> list[TargetInfo]:
    """The CPU runtimes, then ``mcu:<board>`` for every board (sorted by name)."""
    out = [TargetInfo(name, "runtime", text) for name, text in RUNTIMES.items()]
    for name in sorted(BOARDS):
        b = BOARDS[name]
        text = (
            f"bit-exact TFLM int8 simulator on {name}: {b.core} at {b.clock_hz / 1e6:g} MHz, "
            f"{b.sram_bytes // 1024} KB SRAM, {b.flash_bytes // 1024} KB flash "
            f"({b.flash_wait_states} wait states); estimated latency"
        )
        out.append(TargetInfo(b.target, "mcu", text, b.core, b.clock_hz, b.sram_bytes,
                              b.flash_bytes, b.source, b.flash_wait_states))  # fmt: skip
    return out


def get_target_info(name: str) -> TargetInfo:
    """The TargetInfo called ``name``; ValueError lists the known names."""
    targets = {t.name: t for t in list_targets()}
    key = str(name).strip().lower()
    if key not in targets:
        raise ValueError(
            f"unknown target {name!r}; known targets: {', '.join(targets)}. "
            "Run 'edgekiln targets' to see them with their descriptions"
        )
    return targets[key]
