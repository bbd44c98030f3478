"""Write docs/configuration.md from pipeline/config.py: every config key, its type, its default and its comment.

    .venv/bin/python scripts/config_docs.py           # rewrite the page (make docs)
    .venv/bin/python scripts/config_docs.py --check   # exit 1 when the page differs from what would be written

The dataclasses are walked from ``Config``: a field whose type is a dataclass is a section (its docstring, and the
comments on and above its line, describe it), every other field is a key. A key's description is the trailing
``# comment`` on its line(s) in the source, preceded by the comment lines directly above it, if any.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.config import Config  # noqa: E402  (the checkout's, beside this script, whose source is read)

PAGE = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/config_docs.py"


# ------------------------------------------------------------------------------------------ source comments


def _class_comments(cls: type) -> dict[str, list[str]]:
    """{field name: its comment lines} from the source of ``cls`` itself (not its bases): the comment lines
    directly above the field, then the comments on the field's own lines."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    tree = ast.parse(source)
    node = tree.body[0]
    out: dict[str, list[str]] = {}
    for stmt in getattr(node, "body", []):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above = []
        line = stmt.lineno - 1
        while line in comments and line not in code_lines:  # comment-only lines directly above
            above.insert(0, comments[line])
            line -= 1
        own = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
        out[stmt.target.id] = [c for c in above + own if c]
    return out


def field_comments(cls: type) -> dict[str, list[str]]:
    """Comments of every field of the dataclass ``cls``, inherited fields from the base that declares them."""
    out: dict[str, list[str]] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            out.update(_class_comments(base))
    return out


def docstring(cls: type) -> str:
    """The class's own docstring (not the signature that dataclass writes when there is none), on one line."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(doc.split())


# ----------------------------------------------------------------------------------------------- rendering


def render_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return " | ".join([render_type(a) for a in args if a is not type(None)]
                          + (["None"] if type(None) in args else []))
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(render_type(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def render_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return json.dumps(value, ensure_ascii=False)


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped; < and > outside `code` spans as entities, so they are not read as HTML."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|")


def _sections(cls: type, prefix: str, doc: str, depth: int, missing: list[str]) -> list[str]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    heading = "#" * min(depth, 4)
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
    lines = [f"{heading} {title}", ""]
    if doc:
        lines += [_cell(doc).replace("\\|", "|"), ""]
    rows, subs = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        desc = " ".join(comments.get(f.name, []))
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            sub_doc = _sentences(docstring(tp), desc)
            rows.append([_code(key), "section", "", _cell(f"see [{key}](#{_anchor(key)}) below"
                                                             + (f": {desc}" if desc else ""))])
            subs.append((tp, key + ".", sub_doc))
            continue
        if not desc:
            missing.append(key)
        rows.append([_code(key), _code(render_type(tp)), _code(render_default(f)), _cell(desc)])
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for tp, sub_prefix, sub_doc in subs:  # the top level's sections at its own heading level
        lines += _sections(tp, sub_prefix, sub_doc, depth + 1 if prefix else depth, missing)
    return lines


def _sentences(*parts: str) -> str:
    """The non-empty parts as sentences: each capitalised and ended with a full stop."""
    out = []
    for p in (p.strip() for p in parts):
        if p:
            p = p[0].upper() + p[1:]
            out.append(p if p.endswith((".", ")", "?", "!")) else p + ".")
    return " ".join(out)


def _anchor(key: str) -> str:
    """GitHub's anchor of a heading `` `key` ``: lower case, punctuation but - and _ dropped."""
    return re.sub(r"[^\w\- ]", "", key.lower()).replace(" ", "-")


def generate(missing: list[str] | None = None) -> str:
    missing = [] if missing is None else missing
    head = [
        "# Configuration",
        "",
        "<!-- Generated from pipeline/config.py by scripts/config_docs.py: do not edit by hand; run `make docs`. -->",
        "",
        "Every key of a config file, its type, its default and what it does. A config YAML states its data and",
        "the keys that differ from these defaults (`extends:` names a config to start from); `--set key=value` on",
        "the command line overrides one key (`--set classifier.epochs=4`). A misspelt key fails with the closest",
        "valid one. `null` in YAML is `None` below.",
        "",
    ]
    body = _sections(Config, "", docstring(Config), 2, missing)
    return "\n".join(head + body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    missing: list[str] = []
    text = generate(missing)
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run `{COMMAND}` (or `make docs`)", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    if missing:
        print(f"{len(missing)} keys have no comment in pipeline/config.py: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
