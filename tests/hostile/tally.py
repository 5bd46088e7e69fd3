"""The hostile-input tally: every hostile case of a test session, judged and counted once.

A test runs one hostile case with ``judge(call, names=...)`` and counts it with
``TALLY.record(category, case, where, verdict)``. At the end of the session
(``tests/hostile/conftest.py``) the tally is written as JSON to ``REPORT`` and summed up in the
terminal summary. What each outcome means:

- ``error named``: a ValueError (TfliteFormatError, ConfigError, CaptureError, ...),
  FileNotFoundError, TypeError or RunError whose message names the problem: it matches the
  case's ``names`` pattern, or, with no pattern, says more than a word or two;
- ``failed target named``: the target returned ``ok=False`` with an error that names the
  problem (a runtime crash, hang or refusal contained in its child process);
- ``ran``: the call returned normally; for a mutant, it was still a valid model (a flipped
  weight bit) and the target ran it;
- ``not run``: the case was made but not run, with the reason (a valid mutant over the budget
  of runtime child processes);
- ``unnamed error``: an error of a named kind whose message is empty, too short, or does not
  name the problem (``names`` does not match), or a failed target without an error;
- ``crash``: any other exception (IndexError, struct.error, zipfile.BadZipFile, ...): an
  error escaping from inside edgekiln that a user cannot act on.

The first four pass. A test that records ``unnamed error`` or ``crash`` fails, by its own
assertions and, should it forget them, by the ``pytest_runtest_call`` hook in
``tests/hostile/conftest.py``; a known bug is recorded with the reason and pinned by a strict
xfail test, and counted apart (``crash (known bug)``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekiln.run import RunError
from edgekiln.targets.base import TargetResult

REPO = Path(__file__).resolve().parents[2]
REPORT = Path(os.environ.get("EDGEKILN_HOSTILE_REPORT", REPO / ".pytest-reports" / "hostile.json"))

ERROR_NAMED = "error named"
FAILED_TARGET_NAMED = "failed target named"
RAN = "ran"
NOT_RUN = "not run"
UNNAMED = "unnamed error"
CRASH = "crash"
PASSING = (ERROR_NAMED, FAILED_TARGET_NAMED, RAN, NOT_RUN)
OUTCOMES = (*PASSING, UNNAMED, CRASH)  # the order of the report's counts

NAMED_ERRORS = (ValueError, FileNotFoundError, TypeError, RunError)
SHORTEST_NAME = 16  # characters: "bad file" does not name a problem; "scale 0 at 'x'" does


@dataclass(frozen=True)
class Verdict:
    """What one hostile call did: its outcome, the error's type and message (if any)."""

    outcome: str
    error: str = ""
    message: str = ""

    @property
    def passes(self) -> bool:
        return self.outcome in PASSING

    def __str__(self) -> str:
        detail = f"{self.error}: {self.message}" if self.error else self.message
        return f"{self.outcome}: {detail}" if detail else self.outcome


def _names(message: str, names: str | None) -> bool:
    if names is None:
        return len(message.strip()) >= SHORTEST_NAME
    return re.search(names, message, re.IGNORECASE) is not None


def judge(call: Callable[[], Any], names: str | None = None) -> Verdict:
    """Run ``call`` and judge it; ``names`` is a pattern the message must match to name the case.

    >>> judge(lambda: int("x8"), names="invalid literal").outcome
    'error named'
    >>> judge(lambda: [][1]).outcome
    'crash'
    """
    try:
        result = call()
    except NAMED_ERRORS as e:
        named = _names(str(e), names)
        return Verdict(ERROR_NAMED if named else UNNAMED, type(e).__name__, str(e))
    except Exception as e:
        return Verdict(CRASH, type(e).__name__, str(e))
    if isinstance(result, TargetResult) and not result.ok:
        error = str(result.error or "")
        named = bool(result.error) and _names(error, names)
        return Verdict(FAILED_TARGET_NAMED if named else UNNAMED, "TargetResult", error)
    return Verdict(RAN)


def not_run(reason: str) -> Verdict:
    """A case made but not run, with why (it counts, as ``not run``)."""
    return Verdict(NOT_RUN, message=reason)


@dataclass(frozen=True)
class Case:
    """One hostile case: what it was, where it went, what happened, and the test that ran it."""

    category: str
    case: str
    where: str
    outcome: str
    error: str
    message: str
    test: str
    known_bug: str = ""

    @property
    def passes(self) -> bool:
        return self.outcome in PASSING


class Tally:
    """The session's hostile cases, in the order they ran."""

    def __init__(self) -> None:
        self.cases: list[Case] = []
        self.test = ""  # the node id of the running test (set by the autouse fixture)

    def record(
        self, category: str, case: str, where: str, verdict: Verdict, known_bug: str = ""
    ) -> Case:
        """Count one case; ``known_bug`` names the strict xfail test that pins a failing one."""
        entry = Case(
            category,
            case,
            where,
            verdict.outcome,
            verdict.error,
            verdict.message[:300],
            self.test,
            known_bug,
        )
        self.cases.append(entry)
        return entry

    def failures(self, since: int = 0) -> list[Case]:
        """Cases from index ``since`` on that failed and are not known bugs."""
        return [c for c in self.cases[since:] if not c.passes and not c.known_bug]

    def counts(self) -> dict[str, dict[str, int]]:
        """Category -> outcome -> count, plus ``"all"`` over every category.

        A known bug's failing outcome is counted apart, as e.g. ``"crash (known bug)"``.
        """
        by: dict[str, Counter] = {"all": Counter()}
        for c in self.cases:
            outcome = f"{c.outcome} (known bug)" if c.known_bug and not c.passes else c.outcome
            by.setdefault(c.category, Counter())[outcome] += 1
            by["all"][outcome] += 1
        order = [*OUTCOMES, *(f"{o} (known bug)" for o in OUTCOMES)]
        return {cat: {o: n[o] for o in order if n[o]} for cat, n in by.items()}

    def report(self, args: list[str], exitstatus: int | None) -> dict[str, Any]:
        """The JSON report; ``exitstatus=None`` while the session runs (``complete`` false)."""
        counts = self.counts()
        return {
            "complete": exitstatus is not None,
            "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "pytest " + " ".join(args),
            "exitstatus": exitstatus,
            "cases": len(self.cases),
            "outcomes": counts.pop("all"),
            "categories": counts,
            "known_bugs": [asdict(c) for c in self.cases if c.known_bug],
            "rows": [asdict(c) for c in self.cases],
        }

    def write(self, path: Path, args: list[str], exitstatus: int | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(args, exitstatus), indent=1) + "\n")

    def summary(self) -> list[str]:
        """The lines for the terminal summary: the totals, then one line per category."""
        counts = self.counts()

        def spell(outcomes: dict[str, int]) -> str:
            return ", ".join(f"{n} {o}" for o, n in outcomes.items())

        total = counts.pop("all")
        lines = [
            f"hostile inputs: {len(self.cases)} cases" + (f": {spell(total)}" if total else "")
        ]
        width = max((len(cat) for cat in counts), default=0)
        lines += [f"  {cat:{width}s}  {spell(n)}" for cat, n in counts.items()]
        known = [c for c in self.cases if c.known_bug]
        lines += [
            f"  known bug: {c.category}: {c.case}: {c.error}: {c.message[:80]}" for c in known
        ]
        lines.append(f"  report: {_shown(REPORT)}")
        return lines


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


TALLY = Tally()
