"""Data-parallel fine-tuning: two ranks under torchrun (gloo, CPU) and the single-process rules.

The two launched tests start ``tests/_ddp_worker.py`` with ``torchrun --standalone``; each takes
about 20 s on a loaded 2-core machine. The two marked slow run the real command,
``torchrun --nproc-per-node=2 -m edgekiln run``, with every rank's file writes logged (about 30 s
for a whole run, 20 s for one a rank breaks). The rest run in this process, without a process
group.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgekiln.distributed as distributed_module
import edgekiln.pipeline.train as train_module
from edgekiln.distributed import (
    DistContext,
    DistributedError,
    all_ok,
    broadcast_object,
    check_replicas,
    init_distributed,
    on_main,
    replica_digest,
    shard,
    wrap,
)
from edgekiln.pipeline.train import batch_share
from edgekiln.report import verify_manifest

REPO = Path(__file__).parents[1]
WORKER = REPO / "tests" / "_ddp_worker.py"

# After 2 epochs (20 steps of Adam, lr 2e-3) the weights of the 2-rank run and of one process
# with the same global batch differ only through the order of float sums (each rank sums half a
# batch; gloo adds the halves). Measured (two runs, identical): weights 6.7e-8 and biases 2.2e-8
# apart after epoch 1 and after epoch 2, scales 2.1e-7 relative, zero points, masks and steps
# equal, losses 3.1e-8 relative. Since training rounds each bias onto its int32 grid (input
# scale x weight scale), a last-bit difference can flip one bias by one grid step and that step
# feeds the next updates: an earlier version measured 1.15e-5 after epoch 2 that way, with
# masks, zero points and scales still agreeing. 1e-4 (about 3e-4 of a typical weight) bounds
# that; masks and step counts stay exact and scales within 1e-5 relative, which is what a real
# divergence would break. Longer runs drift apart as much as one process does with 1 thread vs
# 2 threads (measured side by side, see docs/distributed.md).
WEIGHT_TOLERANCE = 1e-4


def _torchrun(mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("EDGEKILN_TEST_EPOCHS", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", str(WORKER), mode, str(out)]
    # a timeout, so that a rank waiting forever fails the test instead of hanging it
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    done = _torchrun("train", out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=True)


# ---- two ranks -------------------------------------------------------------------------------


def test_ranks_hold_identical_scales_zero_points_masks_and_weights(two_ranks: Path) -> None:
    rank0, rank1 = _load(two_ranks, "rank0"), _load(two_ranks, "rank1")
    assert rank0["state"].keys() == rank1["state"].keys()
    kinds = {key.rsplit(".", 1)[1] for key in rank0["state"]}
    assert kinds == {"scale", "zero_point", "mask", "step", "param"}
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), key
    assert rank0["losses"] == rank1["losses"]  # the global batch's loss, reported on every rank


def test_masks_reach_the_schedule_and_steps_count_optimizer_steps(two_ranks: Path) -> None:
    state = _load(two_ranks, "rank0")["state"]
    masks = {k: v for k, v in state.items() if k.endswith(".mask")}
    assert len(masks) == 5
    for key, mask in masks.items():
        assert 1.0 - float(mask.mean()) == pytest.approx(0.5, abs=0.01), key
        # 1 projection at constrain + 20 optimizer steps (10 per epoch); DDP's copy is not one
        assert int(state[key.replace(".mask", ".step")]) == 21


def test_two_ranks_match_one_process_with_the_same_global_batch(two_ranks: Path) -> None:
    ranks, single = _load(two_ranks, "rank0"), _load(two_ranks, "single")
    for key, value in ranks["state"].items():
        other = single["state"][key]
        if key.endswith((".mask", ".step")):
            assert torch.equal(value, other), key
        elif key.endswith(".zero_point"):
            # a range 1 ULP away can round a zero point the other way; measured: none did
            assert int((value - other).abs().max()) <= 1, key
        elif key.endswith(".scale"):
            torch.testing.assert_close(value, other, rtol=1e-5, atol=0, msg=key)
        else:
            diff = float((value - other).abs().max())
            assert diff <= WEIGHT_TOLERANCE, f"{key}: max |ddp - single| = {diff:.3e}"
    np.testing.assert_allclose(ranks["losses"], single["losses"], rtol=1e-6)


def test_rules_of_a_distributed_run_are_errors_on_every_rank(two_ranks: Path) -> None:
    for rank in (0, 1):
        errors = json.loads((two_ranks / f"errors{rank}.json").read_text())
        assert "not DistributedDataParallel" in errors["not_ddp"]
        assert "edgekiln.distributed.wrap(model, ctx)" in errors["not_ddp"]
        assert errors["batch"].startswith(
            "TrainConfig.batch_size=63 is the global batch and must split evenly over world size 2"
        )
        assert "use batch_size 62 or 64" in errors["batch"]
        assert json.loads(errors["all_ok"]) == [[1, "rank 1 had no data"]]
    first = json.loads((two_ranks / "errors0.json").read_text())["on_main"]
    second = json.loads((two_ranks / "errors1.json").read_text())["on_main"]
    assert first == "FileExistsError: runs/x is not empty"
    assert second == (
        "DistributedError: rank 0 failed, so rank 1 stops too: FileExistsError: runs/x is not empty"
    )


def test_a_failing_rank_ends_the_run_with_its_error_and_no_manifest(tmp_path: Path) -> None:
    done = _torchrun("fail", tmp_path)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "RuntimeError: rank 1 deliberately failed after epoch 0" in output
    root_cause = output.split("Root Cause")[1]
    assert "rank      : 1" in root_cause
    run_dir = tmp_path / "run"
    assert run_dir.is_dir()
    assert not (run_dir / "manifest.json").exists()
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("epoch")) == ["epoch0.txt"]


# ---- one process -----------------------------------------------------------------------------


def test_docstring_examples() -> None:
    for module in (distributed_module, train_module):
        result = doctest.testmod(module)
        assert result.failed == 0, module.__name__


def test_single_process_context_makes_every_helper_a_no_op() -> None:
    ctx = init_distributed(env={})
    assert ctx == DistContext() and ctx.is_main and not ctx.is_distributed
    assert init_distributed(env={"WORLD_SIZE": "1"}) == ctx
    model = nn.Linear(3, 2)
    assert wrap(model, ctx) is model
    assert broadcast_object({"dir": "runs/a"}, ctx) == {"dir": "runs/a"}
    assert all_ok(True, None, ctx) == []
    check_replicas(model, ctx)
    with pytest.raises(ValueError, match="boom"):
        on_main(lambda: (_ for _ in ()).throw(ValueError("boom")), ctx)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WORLD_SIZE": "two"},
            r"environment variable WORLD_SIZE='two' must be a whole number >= 1; launch with "
            "torchrun",
        ),
        ({"WORLD_SIZE": "2"}, r"RANK is not set but WORLD_SIZE is; launch with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 must be below WORLD_SIZE=2"),
        (
            {"WORLD_SIZE": "2", "RANK": "1"},
            r"WORLD_SIZE=2 but MASTER_ADDR is not set: the ranks cannot find each other\. "
            r"Launch with `torchrun --nproc-per-node=N -m edgekiln run \.\.\.`",
        ),
    ],
)
def test_malformed_launch_environment_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedError, match=message):
        init_distributed(env=env)


def test_unknown_backend_is_named() -> None:
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(DistributedError, match=r"backend='mpi' is not one of \('gloo', 'nccl'\)"):
        init_distributed("mpi", env=env)


def test_batch_share_covers_every_global_batch_once_with_weights_of_its_mean() -> None:
    for size in (1, 2, 5, 64):
        index = torch.arange(100, 100 + size)
        shares = [batch_share(index, rank, 4) for rank in range(4)]
        real = torch.cat([rows[weights > 0] for rows, weights in shares])
        assert sorted(real.tolist()) == index.tolist()
        # the mean over 4 ranks of each rank's weighted sum is the batch mean
        assert sum(float(w.sum()) for _, w in shares) / 4 == pytest.approx(1.0)
        assert all(len(rows) >= 1 for rows, _ in shares)  # every rank runs the step


def test_shard_gives_equal_strided_shards() -> None:
    x, y = np.arange(11), np.arange(11) * 2
    parts = [shard(x, y, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert [len(p[0]) for p in parts] == [3, 3, 3]
    assert sorted(np.concatenate([p[0] for p in parts]).tolist()) == list(range(9))
    assert shard(x, None, DistContext())[1] is None


def test_replica_digest_sees_one_changed_mask_entry() -> None:
    from edgekiln.pipeline.constraints import Prune, constrain

    layer = constrain(nn.Linear(4, 2), Prune(0.5))
    before = replica_digest(layer)
    layer.parametrizations.weight[0].mask[0, 0] = 1 - layer.parametrizations.weight[0].mask[0, 0]
    after = replica_digest(layer)
    assert [k for k in before if before[k] != after[k]] == ["parametrizations.weight.0.mask"]


# ---- the real command ------------------------------------------------------------------------

TINY_RECIPE = """
[model]
kwargs = { input_size = 8, width = 8 }
[data]
source = "digits"
limit = 256
[train]
float_epochs = 1
qat_epochs = 1
batch_size = 32
[targets]
names = ["mcu:nrf52840"]
latency_runs = 1
"""


# Installed as sitecustomize in every rank: logs each path the rank opens for writing, creates,
# renames onto or removes, to $EDGEKILN_TEST_WRITES/rank<r>.txt (os.write on an fd opened
# before the hook, so the hook never sees its own log). Writes made by C++ code are not seen.
AUDIT_HOOK = """
import os, sys

if os.environ.get("RANK") is not None and os.environ.get("EDGEKILN_TEST_WRITES"):
    _log = os.path.join(os.environ["EDGEKILN_TEST_WRITES"], "rank" + os.environ["RANK"] + ".txt")
    _fd = os.open(_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _PATH_ARG = {"os.rename": 1, "os.link": 1, "os.symlink": 1, "os.mkdir": 0, "os.remove": 0,
                 "os.rmdir": 0, "os.truncate": 0, "os.chmod": 0, "shutil.rmtree": 0}

    def _audit(event, args):
        if event == "open":
            path, mode, flags = args
            if not (set(mode or "") & set("wax+") or (flags or 0) & _WRITE):
                return
        elif event in _PATH_ARG:
            path = args[_PATH_ARG[event]]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            os.write(_fd, f"{event}\\t{os.path.abspath(os.fsdecode(path))}\\n".encode())

    sys.addaudithook(_audit)
"""


def _run_command(tmp_path: Path, recipe: str, *args: str, pythonpath: tuple[Path, ...] = ()):
    """``torchrun --nproc-per-node=2 -m edgekiln run RECIPE ...`` in ``tmp_path``, every rank's
    writes logged; returns the finished process and the paths each rank wrote, by rank."""
    (tmp_path / "recipe.toml").write_text(recipe)
    hook, writes = tmp_path / "hook", tmp_path / "writes"
    hook.mkdir()
    writes.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    path = os.pathsep.join(str(p) for p in [hook, REPO, *pythonpath])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    env["EDGEKILN_TEST_WRITES"] = str(writes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "edgekiln", "run", "recipe.toml", "--quiet", *args]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    written = {}
    for rank in (0, 1):
        log = writes / f"rank{rank}.txt"  # created when the hook is installed
        assert log.exists(), f"no write log of rank {rank}: the audit hook did not run there"
        written[rank] = [tuple(line.split("\t", 1)) for line in log.read_text().splitlines()]
    return done, written


def _inside(root: Path, written: list[tuple[str, str]]) -> list[tuple[str, str]]:
    root = root.resolve()
    return [(event, p) for event, p in written if Path(p).resolve().is_relative_to(root)]


@pytest.mark.slow
def test_torchrun_edgekiln_run_writes_one_complete_run_directory(tmp_path: Path) -> None:
    done, written = _run_command(tmp_path, TINY_RECIPE)
    assert done.returncode == 0, done.stderr[-4000:]
    # no --out: rank 0 chose a timestamped directory and the other rank used the same one
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "manifest.json").is_file() and (run_dir / "report.json").is_file()
    assert done.stdout.count("float accuracy") == 1  # rank 0 alone prints the summary
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"][:2] == ["float", "qat"]
    # rank 1 wrote nothing under runs/; rank 0 wrote every file there, and the manifest (its
    # last write) lists all of them, unchanged, with no temporary file left behind
    assert _inside(tmp_path / "runs", written[1]) == []
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert files == sorted([e["path"] for e in manifest["files"]] + ["manifest.json"])
    assert verify_manifest(run_dir) == []
    by_rank0 = {Path(p).resolve() for _, p in _inside(run_dir, written[0])}
    assert {(run_dir / f).resolve() for f in files} <= by_rank0


FAILING_MODEL = """
import os

import torch
from torch import nn


class FailsOnRank1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)
        self.training_steps = 0

    def forward(self, x):
        if self.training and os.environ.get("RANK") == "1":
            self.training_steps += 1
            if self.training_steps == 5:  # the first step of the second epoch
                raise RuntimeError("user model failed on rank 1 in training step 5")
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def build():
    return FailsOnRank1()
"""

FAILING_RECIPE = """
[model]
source = "failing_model:build"
[data]
source = "tiny.npz"
[train]
float_epochs = 2
qat_epochs = 1
batch_size = 16
[targets]
names = ["mcu:nrf52840"]
latency_runs = 1
"""


@pytest.mark.slow
def test_a_rank_failing_in_edgekiln_run_fails_the_run_and_leaves_nothing_complete(
    tmp_path: Path,
) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "failing_model.py").write_text(FAILING_MODEL)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 80)
    np.savez(tmp_path / "tiny.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    out = tmp_path / "out"
    done, written = _run_command(tmp_path, FAILING_RECIPE, "--out", str(out), pythonpath=(user,))
    assert done.returncode != 0
    output = done.stdout + done.stderr
    message = "RuntimeError: user model failed on rank 1 in training step 5"
    assert "edgekiln run: error: user model failed on rank 1 in training step 5" in output
    # the CLI records the error for torchrun, whose summary names rank 1 and shows it
    root_cause = output.split("Root Cause")[1]
    assert "rank      : 1" in root_cause and message in root_cause
    # rank 0 made the directory and may have checkpointed epoch 1, but nothing in it looks like
    # a finished run: no manifest, no report, no stage marked complete
    assert out.is_dir()
    assert not (out / "manifest.json").exists() and not (out / "report.json").exists()
    assert not list(out.glob("report*")) and not (out / "model.tflite").exists()
    if (out / "state.json").exists():
        assert json.loads((out / "state.json").read_text())["completed"] == []
    # rank 1's writes are seen (its error file for torchrun), and none went into the run
    assert any(path.endswith("error.json") for _, path in written[1])
    assert _inside(out, written[1]) == []
