"""``edgekiln run``: float training, QAT, capture, export, validation, report — one run directory.

Stages, each ending in files written atomically and a line in ``state.json``:

1. ``float``    train the float model (``checkpoints/float.pt`` after every epoch);
2. ``qat``      prepare it and fine-tune with the recipe's constraints (``checkpoints/qat.pt``);
3. ``capture``  the int8 graph (``graph.npz``) and the fake-quant model's outputs on the test set;
4. ``export``   ``model.onnx`` and ``model.tflite`` from that one graph;
5. ``validate`` every target, compared with the fake-quant model in LSB;
6. ``report``   ``report.json``, ``report.html`` and ``manifest.json`` (last, so a directory with
   a manifest is a complete run).

``resume=True`` picks up after the last completed stage (or epoch) of an interrupted run.
Checkpoints are state dicts loaded with ``weights_only=True``: a run directory is data.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from edgekiln.config import ConfigError, ModelConfig, RunConfig, parse_config
from edgekiln.distributed import DistContext, check_replicas, shutdown, sync_from_main, wrap
from edgekiln.ir import atomic_write, load_graph, save_graph

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
RUN_MARKERS = (STATE_FILE, "manifest.json", "report.json")  # one of them: an edgekiln run dir
STAGES = ("float", "qat", "capture", "export", "validate", "report")
ARTIFACTS = {"onnx": "model.onnx", "tflite": "model.tflite"}


class RunError(RuntimeError):
    """A run that cannot go on; the message names the stage and the way out."""


class Progress(Protocol):
    """What a run reports while it works (the CLI draws bars; the library never prints)."""

    def start(self, stage: str, total: int | None) -> None:
        """A stage begins; ``total`` steps when known."""

    def advance(self, n: int = 1, note: str = "") -> None:
        """``n`` steps done."""

    def finish(self) -> None:
        """The stage ended."""


class _Silent:
    def start(self, stage: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1, note: str = "") -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class _State:
    """``state.json``: the recipe, the stages done, and what they measured."""

    recipe: dict[str, Any]
    base: str
    completed: list[str] = field(default_factory=list)
    epochs: dict[str, int] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


def prepare_run_dir(out: Path | None, *, force: bool = False, root: Path = Path("runs")) -> Path:
    """A new run directory: ``out``, or a fresh timestamped one under ``root``.

    A non-empty existing directory is never overwritten unless ``force``, and ``force`` only
    empties a previous run's directory (one holding a file of ``RUN_MARKERS``), never a
    directory of other files such as the one ``--out .`` names.
    """
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = root / stamp
        n = 1
        while out.exists():
            out = root / f"{stamp}-{n}"
            n += 1
    if out.exists() and not out.is_dir():
        raise RunError(f"run directory {str(out)!r} is a file; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise RunError(
                f"run directory {str(out)!r} is not empty; choose another --out, resume it with "
                "--resume, or overwrite it with --force"
            )
        if not any((out / name).is_file() for name in RUN_MARKERS):
            raise RunError(
                f"run directory {str(out)!r} is not empty and is not an edgekiln run directory "
                f"(it has none of {', '.join(RUN_MARKERS)}), so --force does not delete it; "
                "choose another --out, or empty the directory yourself"
            )
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(
    config: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline into ``run_dir`` and return the report (also in report.json).

    With ``resume=True`` the recipe is read back from ``run_dir/state.json`` and finished
    stages are skipped.
    """
    progress = progress or _Silent()
    ctx = ctx or DistContext()  # torchrun: every rank trains; rank 0 alone writes run_dir
    run_dir = Path(run_dir)
    if resume:
        state = _load_state(run_dir)
        config = parse_config(state.recipe, Path(state.base), config.source)
    check_ranks(config, ctx)
    if not resume:
        state = _State(recipe=config.raw, base=config.base)
        if ctx.is_main:
            _save_state(run_dir, state)
    try:
        return _Run(config, run_dir, state, progress, ctx).go()
    except Exception:  # not KeyboardInterrupt: an interrupted run stays resumable, from the start
        if not resume and ctx.is_main:
            _forget_unstarted(run_dir, state)
        raise


def check_ranks(config: RunConfig, ctx: DistContext) -> None:
    """Refuse a recipe whose global batch does not split over torchrun's ranks, before any
    file is written (``fit`` would refuse it only when training starts).

    Raises:
        ConfigError: ``[train] batch_size`` is not a multiple of the world size.
    """
    batch, ranks = config.train.batch_size, ctx.world_size
    if batch % ranks == 0:
        return
    below = batch - batch % ranks
    raise ConfigError(
        f"[train] batch_size = {batch} is the global batch and must split evenly over the "
        f"{ranks} ranks torchrun started (each rank takes batch_size / {ranks}): use "
        f"batch_size = {below or ranks} or {below + ranks}, or a number of processes that "
        f"divides {batch}"
    )


def _forget_unstarted(run_dir: Path, state: _State) -> None:
    """After a run failed before its first stage or checkpoint (a data or model error), take
    back its ``state.json`` so the directory is as empty as it was and the same ``--out``
    works again without ``--force``; a run with anything to resume from is left as it is."""
    checkpoints = run_dir / "checkpoints"
    no_checkpoint = checkpoints.is_dir() and not any(checkpoints.iterdir())
    written = [p for p in run_dir.iterdir() if p.name != STATE_FILE]
    if no_checkpoint:
        written.remove(checkpoints)
    if state.completed or state.epochs or written:
        return
    if no_checkpoint:
        checkpoints.rmdir()
    (run_dir / STATE_FILE).unlink(missing_ok=True)


def load_prepared(run_dir: Path) -> tuple[nn.Module, Any, RunConfig]:
    """The trained prepared model of a finished run, its graph and its recipe.

    The model is rebuilt from the recipe and ``checkpoints/qat.pt`` (loaded with
    ``weights_only=True``); the graph is ``graph.npz``.
    """
    from edgekiln.pipeline.prepare import prepare

    config = load_run_config_for_resume(run_dir)
    graph_path = Path(run_dir) / "graph.npz"
    if not graph_path.is_file():
        raise RunError(f"{str(run_dir)!r} has no graph.npz: the run did not reach capture")
    graph = load_graph(graph_path)
    shape = graph.tensor(graph.inputs[0]).shape[1:]
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.source, config.model.kwargs)
    prepared = prepare(model.eval(), torch.zeros(2, *shape), config.recipe())
    prepared.load_state_dict(_load_checkpoint(Path(run_dir) / "checkpoints" / "qat.pt")["model"])
    return prepared.eval(), graph, config


def load_run_config_for_resume(run_dir: Path) -> RunConfig:
    """The recipe an interrupted run was started with."""
    state = _load_state(run_dir)
    return parse_config(state.recipe, Path(state.base), "resumed")


class _Run:
    def __init__(
        self, config: RunConfig, run_dir: Path, state: _State, progress: Progress, ctx: DistContext
    ):
        self.ctx = ctx
        self.config = config
        self.dir = run_dir
        self.state = state
        self.progress = progress
        self.started = time.monotonic()

    # ---- the stages, in order ------------------------------------------------------------

    def go(self) -> dict[str, Any]:
        torch.manual_seed(self.config.train.seed)
        data = self._data()
        float_model = self._float_stage(data)
        prepared = self._qat_stage(data, float_model)
        if self.ctx.is_distributed:
            check_replicas(prepared, self.ctx)  # scales, zero points, masks, weights: all equal
            shutdown(self.ctx)  # capture, export, validation, sweeps, report: rank 0 alone
            if not self.ctx.is_main:
                return {}
        graph, fake_quant = self._capture_stage(data, prepared)
        self._sparsity_stage(data, float_model, graph)
        artifacts = self._export_stage(graph)
        targets, pairs = self._validate_stage(data, graph, fake_quant, artifacts)
        return self._report_stage(data, prepared, graph, artifacts, targets, pairs)

    def _data(self) -> Any:
        from edgekiln.models.datasets import check_input_shape, load_dataset, load_npz

        cfg = self.config.data
        where = f"[data] source = {cfg.source!r}"
        if cfg.is_builtin:
            dataset = load_dataset(cfg.source)
        else:
            try:
                dataset = load_npz(cfg.source)
            except (OSError, ValueError) as e:  # load_npz's message starts with the path
                raise ConfigError(f"{where}: {str(e).removeprefix(cfg.source + ': ')}") from e
        if cfg.limit:
            dataset = _limit(dataset, cfg.limit)
        if len(dataset.x_test) == 0:
            raise ConfigError(f"{where}: the test set is empty; x_test needs samples")
        self._check_train_split(dataset, where)
        shape = self.config.model.input_shape or tuple(dataset.input_shape)
        if self.config.model.input_shape is not None:
            try:
                check_input_shape(dataset, shape)
            except ValueError as e:
                raise ConfigError(
                    f"[model] input_shape = {list(shape)} does not fit {where}: {e}"
                ) from e
        self.input_shape = tuple(shape)
        self.task = (
            "classification"
            if dataset.y_test is not None and dataset.num_classes
            else ("reconstruction")
        )
        return dataset

    def _check_train_split(self, dataset: Any, where: str) -> None:
        """Refuse training epochs on data without a train split (calibration uses x_test)."""
        if len(dataset.x_train):
            return
        train = self.config.train
        epochs = {"float_epochs": train.float_epochs, "qat_epochs": train.qat_epochs}
        if self._prune_then_qat():
            epochs["prune_epochs"] = train.prune_epochs
        asked = [f"{key} = {n}" for key, n in epochs.items() if n]
        if not asked:
            return
        raise ConfigError(  # load_npz gives an empty split only without both keys
            f"{where} has no training split (the keys x_train and y_train are missing), but "
            f"[train] {', '.join(asked)} train on it; add x_train and y_train to the file, or "
            f"set [train] {' and '.join(epochs)} to 0 to only calibrate on x_test"
        )

    def _model(self, data: Any) -> nn.Module:
        torch.manual_seed(self.config.train.seed)
        return build_model(self.config.model.source, self.config.model.kwargs)

    def _float_stage(self, data: Any) -> nn.Module:
        from edgekiln.pipeline.train import TrainConfig

        model = self._model(data)
        _check_forward(model, self.input_shape, self.config.model)
        train = self.config.train
        ckpt = self.dir / "checkpoints" / "float.pt"
        if "float" in self.state.completed:
            model.load_state_dict(_load_checkpoint(ckpt)["model"])
            return model.eval()
        optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
        first = self._restore(ckpt, model, optimizer, "float")
        losses = list(self.state.facts.get("float_loss", []))
        if train.float_epochs > first:

            def saved(epoch: int, loss: float) -> None:
                losses.append(loss)
                self.state.facts["float_loss"] = losses
                self._checkpoint(ckpt, model, optimizer, "float", epoch + 1)

            self._train(
                model,
                data,
                optimizer,
                "float training",
                TrainConfig(train.float_epochs, train.batch_size, train.lr, train.seed),
                first,
                saved,
            )
            sync_from_main(model, self.ctx)  # BatchNorm statistics are rank-local until here
        elif not ckpt.exists():
            self._checkpoint(ckpt, model, optimizer, "float", 0)
        self._complete("float")
        return model.eval()

    def _qat_stage(self, data: Any, float_model: nn.Module) -> nn.Module:
        from edgekiln.pipeline.prepare import prepare
        from edgekiln.pipeline.train import predict

        if "float_accuracy" not in self.state.facts:
            self.state.facts["float_accuracy"] = self._accuracy(
                predict(float_model, data.x_test), data
            )
        prepared = prepare(float_model, self._example(data), self.config.recipe())
        ckpt = self.dir / "checkpoints" / "qat.pt"
        if "qat" in self.state.completed:
            prepared.load_state_dict(_load_checkpoint(ckpt)["model"])
            return prepared.eval()
        self._finetune(prepared, data, ckpt, "qat")
        self._complete("qat")
        return prepared.eval()

    def _finetune(self, prepared: nn.Module, data: Any, ckpt: Path | None, stage: str) -> None:
        """QAT (after a pruning phase in prune_then_qat mode), or calibration with no epochs.

        With ``ckpt`` every epoch is checkpointed and a resumed run starts after the last one.
        """
        from edgekiln.pipeline.constraints import start_qat
        from edgekiln.pipeline.train import TrainConfig, calibrate

        train = self.config.train
        optimizer = torch.optim.Adam(prepared.parameters(), lr=train.qat_lr)
        first = self._restore(ckpt, prepared, optimizer, stage) if ckpt else 0
        phased = self._prune_then_qat()
        prune_epochs = train.prune_epochs if phased else 0
        epochs = prune_epochs + train.qat_epochs
        if phased and first >= prune_epochs:
            # In the QAT phase already: resumed into it, or no pruning epochs were asked for
            # (the masks are then taken from the float weights). Idempotent.
            start_qat(prepared)
        if epochs == 0:
            self.progress.start("calibration", None)
            calibrate(prepared, data.x_train if len(data.x_train) else data.x_test)
            self.progress.finish()
            if ckpt:
                self._checkpoint(ckpt, prepared, optimizer, stage, 0)
            return
        losses = list(self.state.facts.get(f"{stage}_loss", []))

        def saved(epoch: int, loss: float) -> None:
            if prune_epochs and epoch + 1 == prune_epochs:
                start_qat(prepared)  # masks freeze, fake-quantization starts
            losses.append(loss)
            if ckpt:  # a checkpointed phase: its losses go into the report
                self.state.facts[f"{stage}_loss"] = losses
                self._checkpoint(ckpt, prepared, optimizer, stage, epoch + 1)

        if epochs > first:
            label = "prune, then QAT" if prune_epochs else "QAT fine-tuning"
            config = TrainConfig(epochs, train.batch_size, train.qat_lr, train.seed + 1)
            self._train(
                prepared, data, optimizer, label if stage == "qat" else stage, config, first, saved
            )

    def _train(
        self,
        model: nn.Module,
        data: Any,
        optimizer: Any,
        label: str,
        config: Any,
        first: int,
        on_epoch_end: Any,
    ) -> None:
        """One training phase from epoch ``first`` on, with a progress bar (DDP-wrapped)."""
        from edgekiln.pipeline.train import fit

        steps = _steps(len(data.x_train), config.batch_size)
        self.progress.start(label, (config.epochs - first) * steps)
        fit(
            wrap(model, self.ctx),
            data.x_train,
            data.y_train,
            config,
            loss=self._loss(),
            optimizer=optimizer,
            first_epoch=first,
            on_step=lambda e, s, n, v: self.progress.advance(1, f"loss {v:.3f}"),
            on_epoch_end=on_epoch_end,
        )
        self.progress.finish()

    def _prune_then_qat(self) -> bool:
        return str(getattr(self.config.recipe().sparsity_mode, "value", "")) == "prune_then_qat"

    def _example(self, data: Any) -> torch.Tensor:
        x = data.x_train[:2] if len(data.x_train) else data.x_test[:2]
        return torch.from_numpy(np.ascontiguousarray(x))

    def _capture_stage(self, data: Any, prepared: nn.Module) -> tuple[Any, np.ndarray]:
        from edgekiln.pipeline.capture import capture
        from edgekiln.pipeline.train import predict

        graph_path, fq_path = self.dir / "graph.npz", self.dir / "checkpoints" / "fake_quant.npy"
        if "capture" in self.state.completed:
            return load_graph(graph_path), np.load(fq_path, allow_pickle=False)
        self.progress.start("capture", None)
        graph = capture(prepared)
        save_graph(graph, graph_path)
        fake_quant = predict(prepared, data.x_test)
        atomic_write(fq_path, lambda f: np.save(f, fake_quant, allow_pickle=False))
        self.state.facts["fake_quant_accuracy"] = self._accuracy(fake_quant, data)
        self.progress.finish()
        self._complete("capture")
        return graph, fake_quant

    def _sparsity_stage(self, data: Any, float_model: nn.Module, graph: Any) -> None:
        """What sparsity buys: the unpruned model against this one, and the recipe's sweep."""
        from edgekiln.pipeline.capture import capture
        from edgekiln.pipeline.prepare import prepare
        from edgekiln.pipeline.train import predict
        from edgekiln.sparsity_stats import compare_sparsity, sweep_point

        recipe = self.config.recipe()
        board, kernels = self._stats_board(), self.config.targets.kernels
        facts = self.state.facts
        if recipe.prunes and "sparsity_before_after" not in facts:
            self.progress.start("sparsity: dense baseline", None)
            dense = self._calibrated_graph(data, float_model, _without_sparsity(recipe))
            facts["sparsity_before_after"] = compare_sparsity(dense, graph, board, kernels=kernels)
            _save_state(self.dir, self.state)
            self.progress.finish()
        points = facts.setdefault("sweep", [])
        for level in recipe.sparsity_sweep:
            if any(p["sparsity"] == level for p in points):
                continue  # measured before an interruption
            prepared = prepare(float_model, self._example(data), recipe.at_sparsity(level))
            self._finetune(prepared, data, None, f"sweep {100 * level:.0f}%")
            accuracy = self._accuracy(predict(prepared, data.x_test), data)
            points.append(
                sweep_point(level, capture(prepared.eval()), accuracy, board, kernels=kernels)
            )
            _save_state(self.dir, self.state)

    def _calibrated_graph(self, data: Any, float_model: nn.Module, recipe: Any) -> Any:
        from edgekiln.pipeline.capture import capture
        from edgekiln.pipeline.prepare import prepare
        from edgekiln.pipeline.train import calibrate

        prepared = prepare(float_model, self._example(data), recipe)
        calibrate(prepared, (data.x_train if len(data.x_train) else data.x_test)[:512])
        return capture(prepared.eval())

    def _stats_board(self) -> Any:
        """The board of the size and latency comparisons: the first mcu target's."""
        from edgekiln.sparsity_stats import DEFAULT_BOARD
        from edgekiln.targets.mcu.boards import Board

        name = next((n[4:] for n in self.config.targets.names if n.startswith("mcu:")), None)
        custom = {b["name"]: b for b in self.config.targets.boards}
        if name in custom:
            return Board.from_dict(custom[name])
        return name or DEFAULT_BOARD

    def _export_stage(self, graph: Any) -> dict[str, Path]:
        from edgekiln.api import export

        export_cfg = self.config.export
        artifacts = {fmt: self.dir / ARTIFACTS[fmt] for fmt in export_cfg.formats}
        if "export" not in self.state.completed:
            self.progress.start("export", len(artifacts))
            for fmt, path in artifacts.items():
                io = export_cfg.onnx_io if fmt == "onnx" else export_cfg.tflite_io
                export(graph, None, path, io=io)
                self.progress.advance(1, path.name)
            self.progress.finish()
            self._complete("export")
        return artifacts

    def _validate_stage(
        self, data: Any, graph: Any, fake_quant: np.ndarray, artifacts: dict[str, Path]
    ) -> tuple[list[dict], list[dict]]:
        from edgekiln.targets.mcu.boards import Board
        from edgekiln.validate import pairwise, run_targets, target_entry

        saved = self.dir / "checkpoints" / "targets.json"
        if "validate" in self.state.completed:
            doc = json.loads(saved.read_text())
            return doc["targets"], doc["pairwise"]
        cfg = self.config.targets
        boards = {b["name"]: Board.from_dict(b) for b in cfg.boards}
        out_q = graph.tensor(graph.outputs[0]).quant
        grid = (float(out_q.scale[0]), int(out_q.zero_point[0]))
        reference = out_q.quantize(fake_quant).astype(np.int32)
        self.progress.start("validation", len(cfg.names))
        results = run_targets(
            cfg.names,
            artifacts,
            data.x_test,
            data.y_test if self.task == "classification" else None,
            boards=boards,
            kernels=cfg.kernels,
            latency_runs=cfg.latency_runs,
            on_done=lambda r: self.progress.advance(1, f"{r.target} {'ok' if r.ok else 'FAILED'}"),
        )
        self.progress.finish()
        entries = [
            target_entry(
                r,
                artifacts[_fmt(r.target)].name if _fmt(r.target) in artifacts else "",
                reference,
                grid,
            )
            for r in results
        ]
        pairs = pairwise(results, grid)
        atomic_write(
            saved,
            lambda f: f.write(
                json.dumps({"targets": entries, "pairwise": pairs}, default=str).encode()
            ),
        )
        self._complete("validate")
        return entries, pairs

    def _report_stage(
        self,
        data: Any,
        prepared: nn.Module,
        graph: Any,
        artifacts: dict[str, Path],
        targets: list[dict],
        pairs: list[dict],
    ) -> dict[str, Any]:
        from edgekiln.pipeline.diagnostics import quantization_error
        from edgekiln.pipeline.sparsity import sparsity_report
        from edgekiln.report import write_html, write_manifest, write_report
        from edgekiln.validate import artifact_entry

        self.progress.start("report", None)
        sparsity = sparsity_report(prepared).as_dict()
        files = [*artifacts.values(), self.dir / "graph.npz"]
        report = {
            "schema_version": 1,
            "edgekiln_version": _version(),
            "kind": "run",
            "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "recipe": self.config.as_dict(),
            "model": {
                "source": self.config.model.source,
                "input_shape": list(self.input_shape),
                "parameters": int(sum(p.numel() for p in prepared.parameters())),
                "task": self.task,
            },
            "data": {
                "source": self.config.data.source,
                "description": getattr(data, "source", ""),
                "n_train": len(data.x_train),
                "n_test": len(data.x_test),
            },
            "training": {
                "float_accuracy": self.state.facts.get("float_accuracy"),
                "fake_quant_accuracy": self.state.facts.get("fake_quant_accuracy"),
                "float_epochs": self.config.train.float_epochs,
                "qat_epochs": self.config.train.qat_epochs,
                "loss_history": {
                    "float": self.state.facts.get("float_loss", []),
                    "qat": self.state.facts.get("qat_loss", []),
                },
                "seconds": round(time.monotonic() - self.started, 2),
            },
            "sparsity": {
                "total": sparsity["sparsity"],
                "before_after": self.state.facts.get("sparsity_before_after"),
                "layers": [
                    {
                        "name": row["path"],
                        **{k: row[k] for k in ("shape", "zeros", "total", "sparsity")},
                    }
                    for row in sparsity["layers"]
                ],
            },
            "quantization": {"layers": quantization_error(prepared, data.x_test[:256])},
            "sweep": self.state.facts.get("sweep", []),
            "artifacts": [artifact_entry(p, self.dir) for p in files if p.exists()],
            "targets": targets,
            "pairwise": pairs,
            "check": self.config.check,
        }
        write_report(report, self.dir / "report.json")
        write_html(report, self.dir / "report.html")
        self._complete("report")
        write_manifest(self.dir)
        self.progress.finish()
        return report

    # ---- helpers ---------------------------------------------------------------------------

    def _loss(self) -> Any:
        from edgekiln.pipeline.train import Loss

        return Loss.CROSS_ENTROPY if self.task == "classification" else Loss.MSE

    def _accuracy(self, outputs: np.ndarray, data: Any) -> float | None:
        if self.task != "classification" or outputs.ndim != 2:
            return None
        return float((outputs.argmax(axis=1) == data.y_test).mean())

    def _restore(self, ckpt: Path, model: nn.Module, optimizer: Any, stage: str) -> int:
        if not ckpt.exists():
            return 0
        saved = _load_checkpoint(ckpt)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        logger.info("resuming %s after epoch %d", stage, saved["epoch"])
        return int(saved["epoch"])

    def _checkpoint(
        self, ckpt: Path, model: nn.Module, optimizer: Any, stage: str, epoch: int
    ) -> None:
        if not self.ctx.is_main:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
        atomic_write(ckpt, lambda f: torch.save(state, f))
        self.state.epochs[stage] = epoch
        _save_state(self.dir, self.state)

    def _complete(self, stage: str) -> None:
        if stage not in self.state.completed:
            self.state.completed.append(stage)
        if self.ctx.is_main:
            _save_state(self.dir, self.state)


def _without_sparsity(recipe: Any) -> Any:
    import dataclasses

    return dataclasses.replace(
        recipe, sparsity=0.0, pattern="unstructured", sparsity_mode="joint", sparsity_sweep=()
    )


def build_model(source: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The nn.Module that ``"package.module:callable"`` returns; errors name the source."""
    module_name, _, attr = source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"[model] source = {source!r}: cannot import {module_name!r}: {e}; install the "
            "package, or run from (or put on PYTHONPATH) the directory that holds the module"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(
            f"[model] source = {source!r}: {module_name} has no callable {attr!r}; name a "
            f'function or class defined in {module_name}, as "{module_name}:NAME"'
        )
    try:
        model = factory(**(kwargs or {}))
    except Exception as e:
        raise ConfigError(
            f"[model] source = {source!r}: calling it raised {type(e).__name__}: {e}"
        ) from e
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"[model] source = {source!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _check_forward(model: nn.Module, shape: tuple[int, ...], cfg: ModelConfig) -> None:
    """Refuse a model that cannot run a batch of the data; the message names both shapes."""
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *shape))
    except Exception as e:
        if cfg.input_shape is not None:
            given = "the data's shape and the recipe's [model] input_shape"
            fix = "check that [model] input_shape and [model] kwargs are what the model takes"
        else:
            expected = _declared_input_shape(cfg.source)
            given = "the data's shape; no [model] input_shape"
            if expected is None:
                given += " and the model's expected input shape is not declared"
                fix = "declare the shape the model takes as [model] input_shape to check the data"
            else:
                kwargs = " with its default kwargs" if cfg.kwargs else ""
                given += f", but the model expects {list(expected)}{kwargs}"
                fix = "reshape the data or set [model] kwargs to fit it"
        raise ConfigError(
            f"[model] source = {cfg.source!r} does not accept data of shape {list(shape)} "
            f"({given}): {type(e).__name__}: {e}; {fix}"
        ) from e


def _declared_input_shape(source: str) -> tuple[int, ...] | None:
    """The registry's input shape (no batch) of a built-in ``edgekiln.models:NAME``, or None."""
    module_name, _, name = source.partition(":")
    if module_name != "edgekiln.models":
        return None
    from edgekiln.models.registry import MODELS

    spec = MODELS.get(name)
    return None if spec is None else tuple(spec.input_shape)


def _limit(dataset: Any, limit: int) -> Any:
    import dataclasses

    cut = {k: getattr(dataset, k)[:limit] for k in ("x_train", "y_train", "x_test")}
    if dataset.y_test is not None:
        cut["y_test"] = dataset.y_test[:limit]
    return dataclasses.replace(dataset, **cut)


def _steps(n: int, batch: int) -> int:
    return max(1, -(-n // batch))


def _fmt(target: str) -> str:
    from edgekiln.validate import artifact_format

    return artifact_format(target)


def _version() -> str:
    from edgekiln import __version__

    return __version__


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RunError(f"checkpoint {str(path)!r} is missing; start a new run instead of --resume")
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_state(run_dir: Path, state: _State) -> None:
    data = json.dumps(state.__dict__, indent=1, default=str).encode()
    atomic_write(run_dir / STATE_FILE, lambda f: f.write(data))


def _load_state(run_dir: Path) -> _State:
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise RunError(
            f"{str(run_dir)!r} has no {STATE_FILE}: it is not an edgekiln run directory to resume"
        )
    return _State(**json.loads(path.read_text()))
