"""Small HTML helpers for the report: escaping, numbers, tables, embedded images, the page and its CSS.

Everything is inline (CSS in a <style> element, images as data: URIs): the page loads nothing else.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from html import escape

DASH = "–"

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --accent: #1f5fbf; --soft: #f4f6fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fff; }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: var(--soft); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); }
nav { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
      padding: 6px 28px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
main { padding: 4px 28px 40px; max-width: 1400px; }
section { margin-top: 22px; }
h2 { font-size: 18px; margin: 0 0 8px; padding-bottom: 3px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 14px 0 6px; }
p.note, .note { color: var(--muted); font-size: 12.5px; margin: 4px 0 8px; max-width: 1000px; }
p.warn { background: #fff4e5; border-left: 4px solid #e8a33d; padding: 5px 9px; margin: 4px 0; font-size: 13px;
         max-width: 1000px; }
table.t { border-collapse: collapse; margin: 4px 0 10px; font-size: 13px; }
table.t th, table.t td { border: 1px solid var(--line); padding: 3px 8px; }
table.t th { background: var(--soft); font-weight: 600; text-align: center; }
table.t td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.t td.k { font-weight: 600; white-space: nowrap; }
table.t tr.best td.k::after { content: " \\2605"; color: #c27c0e; }
table.t b { color: #0b4a18; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 120px; background: #fff; }
.card .v { font-size: 20px; font-weight: 600; }
.card .l { color: var(--muted); font-size: 12px; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.figs figure { margin: 0; }
figcaption { color: var(--muted); font-size: 12px; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
.grid { overflow-x: auto; }
table.grid { border-collapse: collapse; }
table.grid th { font-size: 12px; font-weight: 600; padding: 2px 3px; text-align: center; vertical-align: bottom; }
table.grid td { padding: 2px 3px; vertical-align: top; }
table.grid td.cap { font-size: 12px; color: var(--muted); padding: 8px 3px 0; }
table.grid img { display: block; image-rendering: auto; }
.sw { display: inline-block; width: 11px; height: 11px; border: 1px solid #0003; vertical-align: -1px;
      margin: 0 3px 0 8px; }
.bar { display: inline-block; height: 10px; background: var(--accent); opacity: .75; vertical-align: middle; }
.cls { font-size: 12.5px; white-space: nowrap; }
"""


def e(text: object) -> str:
    return escape(str(text), quote=True)


def fmt(value: object, digits: int = 3, pct: bool = False) -> str:
    """A number for a table cell: fixed digits, ``pct`` adds %, None or NaN is a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, bool) or not isinstance(value, int | float):
        return e(value)
    return f"{value:.{digits}f}{'%' if pct else ''}"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def img(uri: str, alt: str, width: int | None = None, height: int | None = None, cls: str | None = None) -> str:
    attrs = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    attrs += f' class="{cls}"' if cls else ""
    return f'<img src="{uri}" alt="{e(alt)}"{attrs}>'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], row_classes: Sequence[str] | None = None) -> str:
    """``header`` plain text; ``rows`` cells already in HTML: ``<td>`` added, a cell starting with ``<td`` kept."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="t"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def num(value: object, digits: int = 3, pct: bool = False, bold: bool = False, style: str = "") -> str:
    text = fmt(value, digits, pct)
    style_attr = f' style="{style}"' if style else ""
    return f'<td class="n"{style_attr}>{f"<b>{text}</b>" if bold else text}</td>'


def key(text: str) -> str:
    return f'<td class="k">{e(text)}</td>'


def note(html: str) -> str:
    return f'<p class="note">{html}</p>'


def cards(items: Iterable[tuple[str, str]]) -> str:
    inner = "".join(f'<div class="card"><div class="v">{v}</div><div class="l">{e(label)}</div></div>'
                    for label, v in items)
    return f'<div class="cards">{inner}</div>'


def figure(uri: str, alt: str, caption: str = "", width: int | None = None) -> str:
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f"<figure>{img(uri, alt, width=width, cls='plot')}{cap}</figure>"


def swatch(rgb: Sequence[int], label: str) -> str:
    r, g, b = (int(c) for c in rgb)
    return f'<span class="sw" style="background:rgb({r},{g},{b})"></span>{e(label)}'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{e(title)}</h2>\n{body}\n</section>'


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole document: ``sections`` are (id, title, body HTML), linked from the navigation bar."""
    nav = "".join(f'<a href="#{sid}">{e(t)}</a>' for sid, t, _ in sections)
    body = "\n".join(section(*s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{e(title)}</title>\n'
            f'<link rel="icon" href="data:,">\n<style>{CSS}</style>\n</head>\n<body>\n'
            f'<header><h1>{e(title)}</h1><p>{subtitle}</p></header>\n<nav>{nav}</nav>\n<main>\n{body}\n</main>\n'
            f'</body>\n</html>\n')


def grid(header: Sequence[str], rows: Iterable[tuple[str, str]]) -> str:
    """A grid of image tiles: one row of cells (``<td>``s) under a caption row per entry of ``rows``
    ((caption html, cells html)), under the column ``header``."""
    body = "".join(f'<tr><td class="cap" colspan="{len(header)}">{cap}</td></tr><tr>{cells}</tr>'
                   for cap, cells in rows)
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    return f'<div class="grid"><table class="grid"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
