"""The hostile tally's session: each test's cases checked, the report written at the end.

``.pytest-reports/hostile.json`` (git-ignored; ``$EDGEKILN_HOSTILE_REPORT`` moves it) holds
every case of the last session that collected any; the terminal summary gives the counts. It
is replaced by an empty, ``"complete": false`` one as soon as such a session has collected, so
a session that dies (a crash of this process) never leaves the previous counts looking current.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

import pytest

from tests.hostile.tally import REPORT, TALLY


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Fail a test that recorded a crash or an unnamed error, even if it forgot to assert."""
    first = len(TALLY.cases)
    TALLY.test = item.nodeid
    try:
        result = yield  # raises the test's own failure, which then stands
    finally:
        TALLY.test = ""
    bad = TALLY.failures(first)
    if bad:
        lines = [f"{c.category}: {c.case} on {c.where}: {c.outcome}: {c.message}" for c in bad]
        pytest.fail("hostile cases not named:\n" + "\n".join(lines), pytrace=False)
    return result


HERE = Path(__file__).parent
STARTED = pytest.StashKey[bool]()  # this session selected hostile tests: it owns the report


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(HERE in item.path.parents for item in session.items):
        TALLY.write(REPORT, list(session.config.invocation_params.args), None)
        session.config.stash[STARTED] = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash.get(STARTED, False) or TALLY.cases:
        TALLY.write(REPORT, list(session.config.invocation_params.args), int(exitstatus))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if terminalreporter.config.stash.get(STARTED, False) or TALLY.cases:
        terminalreporter.section("hostile inputs", sep="-")
        for line in TALLY.summary():
            terminalreporter.write_line(line)
