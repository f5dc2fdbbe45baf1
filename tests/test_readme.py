"""The README's examples run as written, and its quick start matches the Makefile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
#: examples followed directly by a plain block: that block is their exact output
SHOWN = dict(
    re.findall(
        r"```python\n((?:(?!```).)*)```\n\n```\n((?:(?!```).)*)```",
        README.read_text(),
        flags=re.S,
    )
)


def _needs(code: str) -> list[str]:
    return [
        m
        for m in ("torch", "tensorflow", "keras")
        if re.search(rf"^import {m}\b", code, re.M)
    ]


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, capsys):
    for module in _needs(code):
        pytest.importorskip(module)
    # a pseudo file name: inspect.getsource (hypothesis uses it) must not read
    # README.md lines as if they were this block
    exec(compile(code, "<README.md block>", "exec"), {"__name__": "readme_example"})
    if code in SHOWN:  # numbers to 3 significant digits: BLAS may vary the last ones
        assert _rounded(capsys.readouterr().out) == _rounded(SHOWN[code])


def _rounded(text: str) -> str:
    return re.sub(r"-?\d\.\d+e[+-]\d+", lambda m: f"{float(m.group()):.2e}", text)


def test_quick_start_has_exactly_two_commands_that_the_makefile_defines():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```\n(.*?)```", section, flags=re.S)[0].strip().splitlines()
    assert commands == ["make audit", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^audit:", makefile, re.M) and re.search(
        r"^test:", makefile, re.M
    )
    assert "make test" in (README.parent / ".ci" / "run").read_text()


def test_at_least_one_example_has_its_output_checked():
    assert len(SHOWN) >= 1 and all(code in BLOCKS for code in SHOWN)
