"""edgekiln.report: report.json (schema version 1), report.html, the regression gate, manifest.json.

The run (``edgekiln run`` / ``edgekiln validate``) builds a report dict, then::

    from edgekiln.report import write_report, write_html, write_manifest
    write_report(report, run_dir / "report.json")   # validates first; ReportError if not
    write_html(report, run_dir / "report.html")
    write_manifest(run_dir)                          # last: hashes every file of the run

and ``edgekiln check REPORT --baseline BASELINE`` does::

    result = check_reports(load_report(report), load_report(baseline), overrides or None)
    print(format_check(result)); return int(result.status)   # 0 pass, 1 regression, 2 unusable

with a :class:`ReportError` from ``load_report`` mapped to exit code 2. The schema is
documented in ``docs/report-schema.md``. This package imports only ``edgekiln.ir`` (for the
atomic write) and the standard library.
"""

from edgekiln.report.check import (
    CheckResult,
    CheckStatus,
    Regression,
    ThresholdError,
    Thresholds,
    check_reports,
    format_check,
)
from edgekiln.report.html import render_html, write_html
from edgekiln.report.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from edgekiln.report.schema import (
    SCHEMA_VERSION,
    ReportError,
    load_report,
    new_report,
    utc_now,
    validate_report,
    write_report,
)

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "CheckResult",
    "CheckStatus",
    "Regression",
    "ReportError",
    "ThresholdError",
    "Thresholds",
    "check_reports",
    "format_check",
    "load_report",
    "new_report",
    "render_html",
    "utc_now",
    "validate_report",
    "verify_manifest",
    "write_html",
    "write_manifest",
    "write_report",
]
