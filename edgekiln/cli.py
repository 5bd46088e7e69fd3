"""The ``edgekiln`` command: run, validate, check, targets, export.

Exit codes: 0 success; 1 a regression (``check``) or a failed target (``validate``,
``compare``); 2 unusable input (a bad recipe, a missing file, a report of another schema, two
runs with no tensor in common for ``compare``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_UNUSABLE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgekiln`` console script and ``python -m edgekiln``."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if not args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return EXIT_UNUSABLE
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line(args.command)
            return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted; resume with `edgekiln run --resume DIR`", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"edgekiln {args.command}: error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE


def _warning_line(command: str) -> Callable[..., None]:
    """Show the library's warnings as ``edgekiln COMMAND: warning: ...`` lines on stderr,
    above any progress bar, instead of Python's file-and-line form."""

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        from tqdm import tqdm

        tqdm.write(f"edgekiln {command}: warning: {message}", file=sys.stderr)

    return show


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgekiln",
        description="Quantization-aware fine-tuning, int8 ONNX/TFLite export and validation "
        "on edge runtimes and simulated microcontrollers.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command")

    r = sub.add_parser("run", help="float training, QAT, export, validation and a report")
    r.add_argument("recipe", nargs="?", type=Path, help="TOML recipe (default: built-in)")
    r.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    r.add_argument(
        "--force",
        action="store_true",
        help="replace a previous edgekiln run in --out (a directory of other files is refused)",
    )
    r.add_argument("--resume", type=Path, metavar="DIR", help="finish an interrupted run")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser("validate", help="run artifacts on targets and write a report")
    v.add_argument("artifacts", nargs="+", type=Path, help=".onnx and/or .tflite files")
    v.add_argument(
        "--data", type=Path, required=True, help=".npz with float x_test (and optional y_test)"
    )
    v.add_argument(
        "--target",
        action="append",
        dest="targets",
        required=True,
        help="onnxruntime | litert | tflm | mcu:BOARD (repeatable)",
    )
    v.add_argument(
        "--kernels",
        default="cmsis-nn",
        choices=("cmsis-nn", "reference"),
        help="kernel library of the mcu latency model",
    )
    v.add_argument(
        "--boards",
        type=Path,
        metavar="FILE.toml",
        help="boards of your own for --target mcu:NAME: [[boards]] tables with the keys of a "
        "recipe's [[targets.boards]] (or a recipe file, whose [[targets.boards]] are read)",
    )
    v.add_argument("--runs", type=int, default=50, help="timed runs per measured target")
    v.add_argument("--json", type=Path, help="write the report (report.json schema) here")
    v.add_argument(
        "--save-outputs",
        type=Path,
        metavar="OUT.npz",
        help="each target's outputs: TARGET holds the raw tensor as the runtime gave it (int8, "
        "or float32 for a float-output ONNX model), TARGET:real the float32 real values, "
        "TARGET:scale and TARGET:zero_point (0-d arrays) the output grid where known",
    )
    v.set_defaults(func=_cmd_validate)

    c = sub.add_parser("check", help="fail when a report regressed against a baseline")
    c.add_argument("report", type=Path)
    c.add_argument("--baseline", type=Path, required=True)
    for name, help_ in (
        ("max-accuracy-drop", "largest allowed accuracy drop, as a fraction (0.005 = 0.5 points)"),
        ("max-agreement-drop", "largest allowed drop of agreement with the fake-quant model"),
        ("max-arena-growth", "largest allowed arena growth, as a fraction"),
        ("max-flash-growth", "largest allowed flash growth, as a fraction"),
        ("max-latency-growth", "largest allowed latency growth, as a fraction"),
    ):
        c.add_argument(f"--{name}", type=float, help=help_)
    c.set_defaults(func=_cmd_check)

    m = sub.add_parser("compare", help="layer by layer: where two targets' int8 results part")
    m.add_argument("artifacts", nargs="*", type=Path, help=".onnx and/or .tflite files")
    m.add_argument(
        "--run",
        type=Path,
        metavar="DIR",
        help="a run directory: its artifacts, and its trained fake-quant model as one side "
        "when one --target is given",
    )
    m.add_argument(
        "--data",
        type=Path,
        help=".npz with float x_test (default with --run: the run's test set)",
    )
    m.add_argument(
        "--target",
        action="append",
        dest="targets",
        required=True,
        help="two targets, or one with --run: onnxruntime | litert | tflm | mcu:BOARD",
    )
    m.add_argument("--samples", type=int, default=16, help="samples to compare (default 16)")
    m.add_argument("--json", type=Path, help="write the per-layer comparison here")
    m.set_defaults(func=_cmd_compare)

    t = sub.add_parser("targets", help="list the targets and board profiles")
    t.add_argument("--json", action="store_true", help="as JSON")
    t.set_defaults(func=_cmd_targets)

    e = sub.add_parser("export", help="write a saved graph as .onnx or .tflite (no PyTorch)")
    e.add_argument("graph", type=Path, help="graph.npz from a run directory")
    e.add_argument("output", type=Path, help="model.onnx or model.tflite")
    e.add_argument("--io", choices=("float", "int8"), help="boundary type (default per format)")
    e.set_defaults(func=_cmd_export)
    return p


# ---- run ---------------------------------------------------------------------------------


class _Bars:
    """tqdm progress bars on stderr, one per stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def start(self, stage: str, total: int | None) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=f"{stage:<16}",
            unit="step",
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
            bar_format=None if total else "{desc} {elapsed}",
        )

    def advance(self, n: int = 1, note: str = "") -> None:
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _cmd_run(args: argparse.Namespace) -> int:
    from edgekiln.config import load_config
    from edgekiln.distributed import init_distributed, on_main, shutdown
    from edgekiln.run import check_ranks, load_run_config_for_resume, prepare_run_dir, run

    if args.resume is not None and (args.recipe is not None or args.out is not None):
        raise ValueError(
            "--resume DIR takes the recipe and directory of that run; drop the recipe and --out"
        )
    ctx = init_distributed()  # under torchrun: this rank; else a single process
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.ERROR)  # rank 0 speaks for the run
    try:
        if args.resume is not None:
            config = load_run_config_for_resume(args.resume)
            run_dir = args.resume
        else:
            config = load_config(args.recipe)
            check_ranks(config, ctx)  # before the run directory exists
            run_dir = on_main(lambda: prepare_run_dir(args.out, force=args.force), ctx)
        bars = _Bars(enabled=not args.quiet and ctx.is_main)
        if ctx.is_main:
            ranks = f" ({ctx.world_size} ranks)" if ctx.is_distributed else ""
            print(f"edgekiln run: {config.source} -> {run_dir}{ranks}", file=sys.stderr)
        if ctx.is_distributed:  # torchrun's failure summary then shows this rank's error
            from torch.distributed.elastic.multiprocessing.errors import record

            run = record(run)  # type: ignore[assignment]  # None only after SystemExit(0)
        report = run(config, run_dir, resume=args.resume is not None, progress=bars, ctx=ctx)
    finally:
        shutdown(ctx)
    if not ctx.is_main:
        return EXIT_OK
    print(summary(report))
    print(f"\nreport: {run_dir / 'report.html'}\n        {run_dir / 'report.json'}")
    return EXIT_OK


def summary(report: dict[str, Any]) -> str:
    """The terminal table: per target accuracy, agreement, latency, arena and flash."""
    lines = []
    training = report.get("training") or {}
    if training:
        lines.append(
            f"float accuracy {_pct(training.get('float_accuracy'))}   "
            f"fake-quant accuracy {_pct(training.get('fake_quant_accuracy'))}   "
            f"sparsity {_pct((report.get('sparsity') or {}).get('total'))}   "
            f"{training.get('seconds', 0):.0f} s"
        )
    header = ("target", "accuracy", "agreement", "LSB max", "latency", "arena", "flash", "status")
    rows = [header]
    for t in report.get("targets", []):
        latency = t.get("latency_ms")
        lat = (
            "-"
            if latency is None
            else (f"{latency:.3f} ms" + (" (est.)" if t.get("latency_kind") == "estimated" else ""))
        )
        lsb = t.get("lsb") or {}
        rows.append(
            (
                t["name"],
                _pct(t.get("accuracy")),
                _pct(t.get("agreement")),
                str(lsb.get("max", "-")),
                lat,
                _kib(t.get("arena_bytes")),
                _kib(t.get("flash_bytes")),
                "ok" if t.get("ok") else "FAILED",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for t in report.get("targets", []):
        if not t.get("ok") and t.get("error"):
            lines.append(f"{t['name']}: {t['error']}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _kib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f} KiB"


# ---- validate ------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    import datetime as dt

    import numpy as np

    from edgekiln.models.datasets import load_npz
    from edgekiln.validate import (
        artifact_entry,
        artifact_format,
        pairwise,
        run_targets,
        target_entry,
    )

    artifacts = _artifacts_by_format(args.artifacts, args.targets)
    boards = _validate_boards(args.boards, args.targets)
    data = load_npz(args.data)
    bars = _Bars(enabled=True)
    bars.start("validation", len(args.targets))
    results = run_targets(
        args.targets,
        artifacts,
        data.x_test,
        data.y_test,
        boards=boards,
        kernels=args.kernels,
        latency_runs=args.runs,
        on_done=lambda r: bars.advance(1, r.target),
    )
    bars.finish()
    report: dict[str, Any] = {
        "schema_version": 1,
        "edgekiln_version": _version(),
        "kind": "validate",
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "recipe": None,
        "model": None,
        "training": None,
        "sparsity": None,
        "quantization": None,
        "data": {
            "source": str(args.data),
            "description": data.source,
            "n_train": 0,
            "n_test": len(data.x_test),
        },
        "artifacts": [artifact_entry(p) for p in artifacts.values()],
        "targets": [
            target_entry(r, str(artifacts.get(artifact_format(r.target), ""))) for r in results
        ],
        "pairwise": pairwise(results),
        "check": {},
    }
    if args.json:
        from edgekiln.report import write_report

        write_report(report, args.json)
    if args.save_outputs:
        from edgekiln.ir import atomic_write

        arrays = _saved_outputs(results)
        atomic_write(args.save_outputs, lambda f: np.savez(f, **arrays))
    print(summary(report))
    for row in report["pairwise"]:
        print(
            f"{row['a']} vs {row['b']}: {row['differing']} of {row['compared']} values differ, "
            f"max {row['max_lsb']} LSB"
        )
    return EXIT_OK if all(r.ok for r in results) else EXIT_FAIL


def _validate_boards(path: Path | None, targets: list[str]) -> dict[str, Any]:
    """The boards of ``--boards FILE`` by name; each ``mcu:NAME`` target must name one of them
    or a built-in board, else the run stops before any target runs."""
    from edgekiln.config import load_boards
    from edgekiln.targets.mcu.boards import BOARDS, get_board

    boards = load_boards(path) if path is not None else {}
    for name in targets:
        if not name.startswith("mcu:") or name[4:] in boards:
            continue
        try:
            get_board(name[4:])
        except ValueError:
            own = (
                f"boards in {str(path)!r}: {', '.join(sorted(boards))}"
                if path is not None
                else "no --boards file given"
            )
            raise ValueError(
                f"--target {name}: unknown board {name[4:]!r}; built-in boards: "
                f"{', '.join(sorted(BOARDS))}; {own}. Pick one of those, or describe the board "
                "in a [[boards]] table of a TOML file and pass it as --boards FILE.toml"
            ) from None
    return boards


def _saved_outputs(results: list[Any]) -> dict[str, Any]:
    """What ``--save-outputs`` writes for each target with outputs: the raw tensor under its
    name, the float32 real values under ``NAME:real``, and the output scale and zero point
    under ``NAME:scale`` and ``NAME:zero_point`` (0-d arrays) when the target knows them."""
    import numpy as np

    arrays: dict[str, Any] = {}
    for r in results:
        if r.outputs is None:
            continue
        arrays[r.target] = r.outputs
        arrays[f"{r.target}:real"] = r.real_outputs()
        if r.output_scale is not None:  # float32, as TFLite and ONNX store a scale
            arrays[f"{r.target}:scale"] = np.array(r.output_scale, np.float32)
        if r.output_zero_point is not None:  # int32: int8 outputs minus it do not wrap
            arrays[f"{r.target}:zero_point"] = np.array(r.output_zero_point, np.int32)
    return arrays


def _version() -> str:
    from edgekiln import __version__

    return __version__


# ---- check, targets, export ------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    from edgekiln.report import ReportError, check_reports, format_check, load_report

    try:
        report, baseline = load_report(args.report), load_report(args.baseline)
    except ReportError as e:
        print(f"edgekiln check: unusable input: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    given = {
        k: getattr(args, k)
        for k in (
            "max_accuracy_drop",
            "max_agreement_drop",
            "max_arena_growth",
            "max_flash_growth",
            "max_latency_growth",
        )
        if getattr(args, k) is not None
    }
    result = check_reports(report, baseline, given or None)  # each given key over the baseline's
    print(format_check(result))
    return int(result.status)


def _cmd_compare(args: argparse.Namespace) -> int:
    from edgekiln.ir import atomic_write
    from edgekiln.models.datasets import load_npz
    from edgekiln.targets.base import TargetResult
    from edgekiln.targets.mcu.compare import compare_results
    from edgekiln.validate import run_target

    wanted = 1 if args.run is not None else 2
    if len(args.targets) not in (wanted, 2):
        raise ValueError(
            f"compare takes exactly two --target, or one with --run DIR; got {len(args.targets)}"
        )
    if args.samples < 1:
        raise ValueError(f"--samples {args.samples}: compare at least 1 sample")
    paths = list(args.artifacts)
    if args.run is not None:
        paths += [p for p in (args.run / "model.tflite", args.run / "model.onnx") if p.is_file()]
    artifacts = _artifacts_by_format(paths, args.targets)
    prepared = graph = None
    if args.run is not None:
        from edgekiln.run import load_prepared

        prepared, graph, config = load_prepared(args.run)
    if args.data is not None:
        x = load_npz(args.data).x_test[: args.samples]
    elif args.run is not None:
        x = _run_test_set(config)[: args.samples]
    else:
        raise ValueError("compare needs --data DATA.npz (or --run DIR to use the run's test set)")
    results = []
    if len(args.targets) == 1:
        from edgekiln.pipeline.diagnostics import fake_quant_intermediates

        ours = fake_quant_intermediates(prepared, graph, x)  # type: ignore[arg-type]
        results.append(TargetResult("fake_quant", "", ok=True, details={"intermediates": ours}))
    for name in args.targets:
        result = run_target(
            name, artifacts[_format_of(name)], x, latency_runs=1, keep_intermediates=True
        )
        if not result.ok and result.outputs is None:
            print(f"edgekiln compare: {name} failed: {result.error}", file=sys.stderr)
            return EXIT_FAIL
        results.append(result)
    comparison = compare_results(*results)
    a, b = results[0].target, results[1].target
    if not comparison.layers:
        raise ValueError(_nothing_matched(results[0], results[1]))
    print(f"{a} vs {b}, {len(x)} samples, per tensor in execution order")
    print(f"{'tensor':<32} {'values':>9} {'differ':>8} {'max LSB':>8}  histogram (LSB: count)")
    for d in comparison.layers:
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(d.histogram.items()))
        print(f"{d.name:<32} {d.count:>9} {d.mismatches:>8} {d.max_lsb:>8}  {hist}")
    if comparison.missing:
        print(f"not in both runs: {', '.join(comparison.missing)}")
    if comparison.identical:
        print(f"identical on every compared tensor ({len(comparison.layers)} tensors)")
    else:
        print(f"first tensor where they part: {comparison.first_divergence}")
    if args.json:
        doc = json.dumps(
            {"a": a, "b": b, "samples": len(x), **comparison.as_dict()}, indent=2, default=str
        )
        atomic_write(args.json, lambda f: f.write(doc.encode()))
    return EXIT_OK


def _nothing_matched(a: Any, b: Any) -> str:
    """Why ``compare`` compared nothing: no tensor name is in both runs' intermediates."""
    seen = []
    for r in (a, b):
        names = sorted((r.details or {}).get("intermediates") or {})
        seen.append(f"{len(names)} in {r.target} (e.g. {', '.join(names[:3]) or 'none'})")
    return (
        f"no tensor could be matched between {a.target} and {b.target}: no name is in both "
        f"runs ({seen[0]}; {seen[1]}), so nothing was compared. Compare artifacts written from "
        "one graph (edgekiln's ONNX and TFLite writers keep its tensor names), e.g. a run "
        "directory's model.onnx and model.tflite, or pass --run DIR with one --target"
    )


def _run_test_set(config: Any) -> Any:
    from edgekiln.models.datasets import load_dataset, load_npz

    data = config.data
    return (load_dataset(data.source) if data.is_builtin else load_npz(data.source)).x_test


def _format_of(target: str) -> str:
    from edgekiln.validate import artifact_format

    return artifact_format(target)


def _artifacts_by_format(paths: list[Path], targets: list[str]) -> dict[str, Path]:
    """The given artifacts by format; every target must find the format it runs."""
    artifacts: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"artifact {str(path)!r} does not exist")
        fmt = {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"artifact {str(path)!r}: use a .onnx or .tflite file")
        if fmt in artifacts:
            raise ValueError(f"two {fmt} artifacts given ({artifacts[fmt]}, {path}); pass one")
        artifacts[fmt] = path
    for name in targets:
        if name in ("onnxruntime", "litert", "tflm") and _format_of(name) not in artifacts:
            raise ValueError(f"target {name!r} needs a .{_format_of(name)} artifact")
    return artifacts


def _cmd_targets(args: argparse.Namespace) -> int:
    from edgekiln.targets.catalog import list_targets

    targets = list_targets()
    if args.json:
        print(json.dumps([t.as_dict() for t in targets], indent=2))
        return EXIT_OK
    for t in targets:
        if t.kind == "runtime":
            print(f"{t.name:<22} {t.description}")
    print("\nsimulated microcontrollers (edgekiln's bit-exact integer simulator):")
    header = f"{'target':<22} {'core':<16} {'clock':>9} {'SRAM':>10} {'flash':>10} {'wait':>4}"
    print(f"{header}  source")
    for t in targets:
        if t.kind == "mcu":
            print(
                f"{t.name:<22} {t.core:<16} {(t.clock_hz or 0) / 1e6:>6.0f} MHz "
                f"{(t.sram_bytes or 0) // 1024:>6} KiB {(t.flash_bytes or 0) // 1024:>6} KiB "
                f"{t.flash_wait_states:>4}  {t.source}"
            )
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from edgekiln.api import export
    from edgekiln.ir import load_graph

    path = export(load_graph(args.graph), None, args.output, io=args.io)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
