"""The README's standalone example runs as written and prints what the README says it prints.

The ``python`` block(s) under the "Standalone use" heading are run verbatim in a fresh
interpreter, on whatever device is there (CPU in CI); their output must equal the ``text``
block that follows them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_isolated

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Standalone use"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def standalone_section() -> str:
    """The README text from the "Standalone use" heading to the next heading of its level."""
    text = README.read_text(encoding="utf-8")
    start = text.find(f"\n{HEADING}\n")
    assert start >= 0, f"README.md has no {HEADING!r} heading"
    body = text[start + len(HEADING) + 2 :]
    end = body.find("\n## ")
    return body if end < 0 else body[:end]


def blocks(section: str, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(section) if lang == language]


def test_standalone_example_runs_and_prints_what_the_readme_says() -> None:
    pytest.importorskip("torch")
    section = standalone_section()
    code = blocks(section, "python")
    expected = blocks(section, "text")
    assert code, "no python block under the Standalone use heading"
    assert len(expected) == 1, "expected one text block with the example's output"
    out = run_isolated("\n".join(code), timeout=300)
    assert out.splitlines() == expected[0].splitlines()
