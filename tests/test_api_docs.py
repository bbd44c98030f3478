"""docs/api.md: its python code blocks run, in order, in one namespace, in a scratch folder (the pipeline example
writes runs/ and datasets/ relative to the working directory)."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_api_page_runs(tmp_path, monkeypatch):
    blocks = code_blocks(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) == 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_docs"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{PAGE.name}[block {i + 1}]", "exec"), namespace)
    assert (tmp_path / "runs" / "api_example" / "pseudo_masks" / "manifest.json").exists()
