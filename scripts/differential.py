"""The long differential run of issue 8: N generated models through every stage and runtime.

    .venv/bin/python scripts/differential.py --models 300 [--seed 1] [--minutes 30] [--json F]

Draws N models from tests/property/strategies.py (hypothesis, seeded), runs each through
tests/property/harness.py's ``check_spec`` and prints, per property, how many models and
values were compared and how many broke it; per runtime, the largest per-op LSB seen for each
op type, the largest end-to-end LSB against its derived bound and how many models' bound was
vacuous (could not fail); the refusals and their
reasons; and every violating spec (paste one into tests/property/test_regressions.py).
Unlike the pytest run it does not stop at the first failure, so the counts are complete.
The run uses about 3 s of two CPU cores per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, seed, settings

from tests.property.harness import Outcome, check_spec, end_to_end_summary
from tests.property.strategies import model_specs


def run(models: int, seed_value: int, log: bool, minutes: float | None = None) -> list[Outcome]:
    """Check ``models`` generated specs (or as many as fit in ``minutes``); return outcomes."""
    outcomes: list[Outcome] = []
    deadline = None if minutes is None else time.perf_counter() + 60 * minutes

    @seed(seed_value)
    @settings(
        max_examples=models,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(spec=model_specs())
    def one(spec):
        if deadline is not None and time.perf_counter() > deadline:
            return  # out of time: the remaining draws are skipped, the summary still prints
        outcome = check_spec(spec)
        outcomes.append(outcome)
        if log:
            print(f"[{len(outcomes)}/{models}] {outcome.status} {outcome.seconds:.1f}s", flush=True)

    one()
    return outcomes


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts per outcome, property, op and runtime (JSON-ready)."""
    status = Counter(o.status for o in outcomes)
    ops: Counter = Counter()
    values: Counter = Counter()
    broken: Counter = Counter()
    step: dict[str, dict[str, int]] = {}
    refusals: Counter = Counter()
    for o in outcomes:
        ops.update(o.op_types)
        values.update(o.values)
        for v in o.violations:
            broken[v.split(":", 1)[0]] += 1
        for runtime, per_op in o.max_step_lsb.items():
            worst = step.setdefault(runtime, {})
            for op, d in per_op.items():
                worst[op] = max(worst.get(op, 0), d)
        if o.status == "refused":
            refusals[o.message.split(":", 1)[0] + ": " + o.message.split(":", 1)[1][:90]] += 1
        for r in o.refusals:
            refusals[r.split(":", 1)[0] + ": XNNPACK requantization scale >= 256"] += 1
    return {
        "models": len(outcomes),
        "status": dict(status),
        "ops": dict(ops),
        "op_instances": sum(ops.values()),
        "values_compared": dict(values),
        "violations_per_property": dict(broken),
        "max_per_op_lsb": step,
        "end_to_end": end_to_end_summary(outcomes),
        "refusals": dict(refusals),
        "seconds": round(sum(o.seconds for o in outcomes), 1),
        "violating_specs": [o.report() for o in outcomes if o.status == "violation"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=300, help="models to generate")
    parser.add_argument("--seed", type=int, default=1, help="hypothesis seed")
    parser.add_argument("--minutes", type=float, help="stop checking after this long")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--quiet", action="store_true", help="no per-model progress lines")
    args = parser.parse_args()
    started = time.perf_counter()
    summary = summarize(run(args.models, args.seed, not args.quiet, args.minutes))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if summary["status"].get("violation") else 0


if __name__ == "__main__":
    sys.exit(main())
