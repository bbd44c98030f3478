"""The user docs: the generated configuration page is current, the README is short, no page speaks in the first
person, and every relative link (and its #anchor) points at something that exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import Config
from pipeline.maps.io import save_maps
from pipeline.runfolder import save_label_png

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
USER_PAGES = [README, *sorted(p for p in DOCS.glob("*.md") if p.name != "experiments.md")]
ALL_PAGES = [README, *sorted(DOCS.glob("*.md"))]


def _config_docs():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (repeats get -1, -2, ...), plus explicit <a id="..."> ones."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    text = re.sub(r"^```.*?^```[^\n]*$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    out.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    return out


def test_configuration_page_is_current():
    module = _config_docs()
    page = DOCS / "configuration.md"
    assert page.exists(), "docs/configuration.md is missing: run `.venv/bin/python scripts/config_docs.py`"
    assert page.read_text(encoding="utf-8") == module.generate(), (
        "docs/configuration.md is stale (pipeline/config.py changed): run `.venv/bin/python scripts/config_docs.py` "
        "(or `make docs`) and commit the page")


def test_configuration_page_lists_every_key():
    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    text = _config_docs().generate()
    for key in keys(Config):
        assert f"| `{key}` |" in text, key


def test_config_docs_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    module = _config_docs()
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration\n", encoding="utf-8")
    monkeypatch.setattr(module, "PAGE", stale)
    monkeypatch.setattr(module, "ROOT", tmp_path)
    assert module.main(["--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scripts/config_docs.py" in err
    assert module.main([]) == 0 and module.main(["--check"]) == 0


def test_readme_is_at_most_300_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= 300, f"README.md has {n} lines (at most 300: move the detail to docs/)"


def test_readme_reaches_own_images_within_the_first_screen():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:60]).lower()
    assert "own images" in head


FIRST_PERSON = re.compile(r"\b(I|we|We|my|My|our|Our)\b")
# not the pronoun: S_c(I), ||I||, ‖I‖, I = 0 (the image in a formula), I/O
MATH_I = re.compile(r"[(‖|]\s*I\b|\bI\s*[)=‖|^²]|\bI/O\b")


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: p.name)
def test_user_pages_do_not_speak_in_the_first_person(page):
    hits = []
    for line in _prose(page.read_text(encoding="utf-8")).splitlines():
        for m in FIRST_PERSON.finditer(MATH_I.sub("", line)):
            hits.append(f"{page.name}: {m.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, "first person in a user page:\n" + "\n".join(hits)


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img\s[^>]*src=\"([^\"]+)\"")


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_existing_files(page):
    broken = []
    for m in LINK.finditer(_prose(page.read_text(encoding="utf-8"))):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: broken links:\n" + "\n".join(broken)


def _fake_run(tmp_path: Path) -> Path:
    """A finished-looking run folder over a 4-image folder dataset: config.yaml, maps/cam, pseudo-masks."""
    root, run = tmp_path / "data", tmp_path / "runs" / "fake"
    classes = ["cat", "dog"]
    labels = {"a": [0], "b": [1], "c": [0, 1], "d": [1]}
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    (root / "labels.csv").write_text("image,labels\n" + "".join(
        f"{i}.png,{' '.join(classes[c] for c in cs)}\n" for i, cs in labels.items()), encoding="utf-8")
    (root / "splits" / "train.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    for i, cs in labels.items():
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        mask = np.zeros((24, 32), np.uint8)
        for k, c in enumerate(cs):
            mask[4 + 8 * k:12 + 8 * k, 6:20] = c + 1
        save_label_png(root / "masks" / f"{i}.png", mask)
        save_label_png(run / "pseudo_masks" / "SegmentationClass" / f"{i}.png", np.roll(mask, 2, axis=1))
        maps = rng.random((len(cs), 24, 32)).astype(np.float32)
        save_maps(run / "maps" / "cam" / f"{i}.npz", maps, np.asarray(cs), classes)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"kind": "folder", "root": str(root), "background": True}, "maps": {"split": "train"}}))
    return run


def test_readme_figure_composes_image_cam_pseudo_mask_gt_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("readme_figure", ROOT / "scripts" / "readme_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run, out = _fake_run(tmp_path), tmp_path / "overview.jpg"
    assert module.main([str(run), str(out), "--thumb", "64"]) == 0
    with Image.open(out) as im:
        # 4 columns of 64 px, 3 rows of 48 px, gaps and the title strip
        assert im.size == (4 * 64 + 5 * module.GAP, module.TITLE_H + 3 * 48 + 4 * module.GAP)
    assert module.main([str(tmp_path / "runs" / "fake"), str(out), "--ids", "c"]) == 0
