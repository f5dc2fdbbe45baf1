"""Helpers the repro-bundle tests share (tests/test_repro*.py): a directory's
bundles, a replay through the CLI, an edit of a bundle.json, and the replay
assertions (in-process, through the CLI, with edited versions)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradcheck import repro
from gradcheck.cli import main


def list_bundles(root: Path) -> list[Path]:
    """The bundles directly under ``root`` (none where it does not exist)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if (p / "bundle.json").is_file())


def cli_replay(capsys: Any, bundle: Path | str) -> tuple[int, str]:
    """``gradcheck replay <bundle>``: its exit code and what it printed."""
    capsys.readouterr()
    code = main(["replay", str(bundle)])
    return code, capsys.readouterr().out


def edit_bundle(bundle: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """``edit`` applied to the bundle's bundle.json (plain JSON)."""
    doc = json.loads((bundle / "bundle.json").read_text())
    edit(doc)
    (bundle / "bundle.json").write_text(json.dumps(doc))


def assert_replays(bundle: Path, status: str, capsys: Any, **versions: str) -> None:
    """The bundle reproduces ``status`` in-process and through the CLI, and
    again with ``versions`` (package: version, at least one) written into it,
    the CLI then naming each package that differs, with the version here."""
    assert versions, "name a version to edit"
    result = repro.replay(bundle)
    assert result.reproduced and result.report.status == status, result.lines()
    assert result.verdict_line() == f"reproduced: {status}"
    code, out = cli_replay(capsys, bundle)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"reproduced: {status}"
    edit_bundle(bundle, lambda d: d["versions"].update(versions))
    code, out = cli_replay(capsys, bundle)
    assert code == 0, out
    differ = "; ".join(
        f"{pkg}: bundle {v}, here {sys.modules[pkg].__version__}"
        for pkg, v in sorted(versions.items())
    )
    assert f"versions differ in {differ}" in out
    assert out.strip().splitlines()[-1] == f"reproduced: {status}"
