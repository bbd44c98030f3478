"""The layout's rules that code review would otherwise have to remember: the library does not import the stages."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_the_library_does_not_import_stages():
    offenders = [f"{path.relative_to(REPO)}:{line}: imports {name}"
                 for path in sorted((REPO / "pipeline").rglob("*.py"))
                 for line, name in _imported_modules(path)
                 if name == "stages" or name.startswith("stages.")]
    assert not offenders, "pipeline/ must not import stages/:\n" + "\n".join(offenders)
