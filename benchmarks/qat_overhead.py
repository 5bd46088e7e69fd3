"""Cost of QAT: one training step of a prepared model (int8 QAT + 50% pruning) vs the float model.

Two small CNNs at batch 64 on 28x28 inputs: a plain one (conv 1->16 at full resolution, conv
16->32 stride 2, conv 32->32, global average pool, linear 32->10), where activations are large
against the convolutions' arithmetic, and edgekiln's default ``small_cnn`` (BatchNorm, a
residual block, max pools; its float model trains BatchNorm, which the prepared model has folded).
A step is forward, backward and an Adam step. The models are timed in
one run, interleaved, after a warm-up; the median over the steps is reported. Rows: the float
model; the kernels alone constrained with Prune(0.5) + FakeQuant; and the issue's target, the
``edgekiln.prepare`` model: weights pruned and fake-quantized, every activation fake-quantized.

Run: ``.venv/bin/python benchmarks/qat_overhead.py [--steps 50] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from edgekiln.models import small_cnn as edgekiln_small_cnn
from edgekiln.pipeline.constraints import FakeQuant, Prune, constrain
from edgekiln.pipeline.prepare import prepare
from edgekiln.pipeline.recipe import Recipe


def small_cnn() -> nn.Sequential:
    """The benchmark model; the same seed gives the same initial weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # (B, 16, 28, 28)
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),  # (B, 32, 14, 14)
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),  # (B, 32, 14, 14)
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, 32)
        nn.Linear(32, 10),
    )


def constrained_cnn() -> nn.Sequential:
    """The benchmark model with Prune(0.5) + FakeQuant on every conv and linear kernel."""
    model = small_cnn()
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            constrain(layer, Prune(0.5), FakeQuant())
    return model


def step_timer(model: nn.Module, x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """A closure that runs one training step and returns its wall time in seconds."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    """Time both models and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    runs = {"float": step_timer(small_cnn(), x, y)}
    runs["kernels: Prune + FakeQuant"] = step_timer(constrained_cnn(), x, y)
    prepared = prepare(small_cnn(), x, Recipe(sparsity=0.5)).train()
    runs["prepare(): QAT + 50% prune"] = step_timer(prepared, x, y)
    torch.manual_seed(0)
    runs["edgekiln small_cnn: float"] = step_timer(edgekiln_small_cnn(), x, y)
    torch.manual_seed(0)
    default = prepare(edgekiln_small_cnn().eval(), x, Recipe(sparsity=0.5)).train()
    runs["edgekiln small_cnn: prepare()"] = step_timer(default, x, y)

    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name, step in runs.items():  # interleaved, so drift hits both alike
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)

    def base(name: str) -> str:
        return "edgekiln small_cnn: float" if name.startswith("edgekiln") else "float"

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch 64, 28x28x1")
    print(f"{args.warmup} warm-up steps, then {args.steps} (forward + backward + Adam step)")
    print("target: each prepare() row at most 1.30x its own float row")
    print("ratio: of the medians; min ratio: of the fastest steps, which a shared machine's")
    print("other load disturbs least")
    print()
    print(f"| {'model':<29} | {'median ms':>9} | {'p90 ms':>7} | {'min ms':>6} | {'ratio':>5} "
          f"| {'min ratio':>9} |")  # fmt: skip
    print(f"|{'-' * 31}|{'-' * 11}|{'-' * 9}|{'-' * 8}|{'-' * 7}|{'-' * 11}|")
    for name, samples in times.items():
        median, fastest = statistics.median(samples), min(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        ratio = median / statistics.median(times[base(name)])
        min_ratio = fastest / min(times[base(name)])
        print(
            f"| {name:<29} | {median * 1e3:9.2f} | {p90 * 1e3:7.2f} | {fastest * 1e3:6.2f} "
            f"| {ratio:5.2f} | {min_ratio:9.2f} |"
        )


if __name__ == "__main__":
    main()
