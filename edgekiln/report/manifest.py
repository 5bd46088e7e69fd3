"""manifest.json: the SHA-256 and size of every file of a run directory, to prove it unchanged.

Layout (paths relative to the run directory, ``/``-separated, sorted)::

    {"manifest_version": 1, "algorithm": "sha256",
     "files": [{"path": "model.onnx", "bytes": 10342, "sha256": "9f2c..."}, ...]}

Left out: ``manifest.json`` itself and temporary files (names ending in ``.tmp``, which is
what an interrupted atomic write leaves behind).

>>> import tempfile, pathlib
>>> run = pathlib.Path(tempfile.mkdtemp())
>>> _ = (run / "report.json").write_text("{}")
>>> write_manifest(run).name
'manifest.json'
>>> verify_manifest(run)
[]
>>> _ = (run / "report.json").write_text("{ }")
>>> verify_manifest(run)
['report.json: changed (2 B, sha256 44136fa355b3... in the manifest; now 3 B, sha256 \
257c1be96ae6...)']
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgekiln.ir import atomic_write
from edgekiln.report.schema import ReportError

__all__ = ["MANIFEST_NAME", "verify_manifest", "write_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_temporary(name: str) -> bool:
    return name.endswith(".tmp")


def _run_files(run_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``run_dir``, sorted."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(run_dir).as_posix()
            if rel == MANIFEST_NAME or _is_temporary(name) or not path.is_file():
                continue
            found.append(rel)
    return sorted(found)


def _entries(run_dir: Path) -> list[dict[str, Any]]:
    return [
        {"path": rel, "bytes": (run_dir / rel).stat().st_size, "sha256": _sha256(run_dir / rel)}
        for rel in _run_files(run_dir)
    ]


def _require_dir(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(
            f"run directory {path} does not exist or is not a directory; pass the directory "
            "`edgekiln run` wrote (the one holding report.json)"
        )
    return path


def write_manifest(run_dir: str | os.PathLike[str]) -> Path:
    """Hash every file in ``run_dir`` and write ``run_dir/manifest.json`` atomically.

    Call it last, after every artifact and report is written. Returns the manifest's path.
    Raises :class:`~edgekiln.report.schema.ReportError` when ``run_dir`` is not a directory.
    """
    path = _require_dir(run_dir)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "algorithm": "sha256",
        "files": _entries(path),
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write(path / MANIFEST_NAME, lambda f: f.write(data))


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    where = path / MANIFEST_NAME
    if not where.is_file():
        raise ReportError(
            f"{where} does not exist; write it with edgekiln.report.write_manifest(run_dir) "
            "after the run, or check a directory that `edgekiln run` wrote"
        )
    try:
        obj = json.loads(where.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{where} is not valid JSON: {e}") from e
    files = obj.get("files") if isinstance(obj, dict) else None
    if not (
        isinstance(obj, dict)
        and obj.get("manifest_version") == MANIFEST_VERSION
        and isinstance(files, list)
        and all(
            isinstance(e, dict)
            and isinstance(e.get("path"), str)
            and isinstance(e.get("bytes"), int)
            and isinstance(e.get("sha256"), str)
            for e in files
        )
    ):
        raise ReportError(
            f"{where} is not an edgekiln manifest version {MANIFEST_VERSION} (expected "
            '{"manifest_version": 1, "algorithm": "sha256", "files": [{"path", "bytes", '
            '"sha256"}, ...]}); re-create it with write_manifest(run_dir)'
        )
    return {e["path"]: e for e in files}


def verify_manifest(run_dir: str | os.PathLike[str]) -> list[str]:
    """Problems between ``run_dir`` and its ``manifest.json``; an empty list when they match.

    One line per file: ``missing`` (listed, not on disk), ``changed`` (size or SHA-256
    differ; both shown), ``extra`` (on disk, not listed). Raises
    :class:`~edgekiln.report.schema.ReportError` when the directory or the manifest itself
    is missing or unreadable.
    """
    path = _require_dir(run_dir)
    recorded = _read_manifest(path)
    present = set(_run_files(path))
    problems = []
    for rel in sorted(set(recorded) | present):
        if rel not in present:
            problems.append(f"{rel}: missing (listed in {MANIFEST_NAME}, not in {path})")
        elif rel not in recorded:
            problems.append(f"{rel}: extra (in {path}, not listed in {MANIFEST_NAME})")
        else:
            want, size = recorded[rel], (path / rel).stat().st_size
            digest = _sha256(path / rel)
            if size != want["bytes"] or digest != want["sha256"]:
                problems.append(
                    f"{rel}: changed ({want['bytes']} B, sha256 {want['sha256'][:12]}... in the "
                    f"manifest; now {size} B, sha256 {digest[:12]}...)"
                )
    return problems
