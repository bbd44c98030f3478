"""The report stage: report.html of a small run (made here, stage by stage), self-contained, every section, and
rendered by headless Chromium without console errors and with every image loaded; the faithfulness section of
metrics.json and its cache; a run without GT; the segmenter section only when metrics.json has one."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import on_tiny

from pipeline.config import load_config
from pipeline.data import maps_dataset
from pipeline.report import build_report
from pipeline.runfolder import write_json
from stages.cli import main

CHROMIUM = Path("/usr/bin/chromium")
SECTIONS = {"dataset": "Dataset", "labels": "What the labels can teach", "confidence": "Confidence and review queue",
            "classifier": "Classifier", "methods": "Methods: mIoU and faithfulness",
            "pseudo-masks": "Pseudo-masks and baselines", "per-class": "Per-class IoU", "curves": "Curves",
            "samples": "Samples", "class-model": "Class model visualisations", "time": "Time per stage"}
FAITHFULNESS_KEYS = {"average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "energy_pointing_game"}
STAGES = ("train_classifier", "make_maps", "refine", "export", "evaluate", "report")
SMALL = {
    "device": "cpu",
    "data": {"kind": "synthetic", "synthetic": {"n_train": 10, "n_val": 4, "size": 48, "seed": 2}},
    "classifier": {"backbone": "smallcnn", "input_size": 48, "epochs": 1, "batch_size": 4},
    "maps": {"methods": ["cam", "gradcam"], "visualizations": ["class_model"], "flip": False,
             "class_model": {"steps": 4, "size": 24}},
    "refine": {"workers": "1", "refiners": ["threshold", "graphcut"]},
    "evaluate": {"faithfulness": {"limit": 4, "steps": 4}},
    "report": {"samples": 3},
}


def run_stages(config: Path, stages=STAGES) -> None:
    """The stages one by one (not ``all``: stages added later, such as a segmenter, are not this test's)."""
    for stage in stages:
        assert main([stage, "--config", str(config)]) == 0, stage


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("report")
    cfg = {**SMALL, "run_dir": str(base / "run"), "data": {**SMALL["data"], "root": str(base / "data")}}
    path = base / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    run_stages(path)
    return base / "run", path


def test_metrics_have_faithfulness_of_every_per_image_method(small_run):
    run, _ = small_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["faithfulness"]) == {"cam", "gradcam"}  # class_model is a visualisation, not a map method
    for result in metrics["faithfulness"].values():
        assert set(result) >= FAITHFULNESS_KEYS and result["images"] == 4 and result["pairs"] >= 4
        assert 0 <= result["average_drop"] <= 100 and 0 <= result["increase_in_confidence"] <= 100
        assert all(0 <= result[k] <= 1 for k in ("deletion_auc", "insertion_auc", "energy_pointing_game"))
        assert len(result["curves"]["deletion"]) == len(result["curves"]["insertion"]) == 5
    assert "faithfulness" in metrics["timing_s"]
    assert (run / "plots" / "faithfulness.png").stat().st_size > 1000


def test_faithfulness_is_cached_across_evaluate_reruns(small_run, monkeypatch):
    run, path = small_run
    before = json.loads((run / "metrics.json").read_text())["faithfulness"]

    def fail(*args, **kwargs):
        raise AssertionError("faithfulness recomputed although nothing it reads changed")

    monkeypatch.setattr("pipeline.metrics.faithfulness.Probe.scores", fail)
    assert main(["evaluate", "--config", str(path), "--set", "evaluate.sweep=[0.3,0.5]"]) == 0
    assert json.loads((run / "metrics.json").read_text())["faithfulness"] == before
    with pytest.raises(AssertionError, match="recomputed"):  # other options: recomputed
        main(["evaluate", "--config", str(path), "--set", "evaluate.faithfulness.steps=3"])
    monkeypatch.undo()
    assert main(["evaluate", "--config", str(path), "--force"]) == 0  # back to the fixture's config


def test_report_is_self_contained_with_every_section(small_run):
    run, _ = small_run
    html = (run / "report.html").read_text(encoding="utf-8")
    for sid, title in SECTIONS.items():
        assert f'<section id="{sid}"><h2>{title}</h2>' in html
    assert 'id="segmenter"' not in html  # metrics.json has no segmenter
    labels = html.split('<section id="labels">')[1].split("</section>")[0]
    stats = json.loads((run / "label_stats.json").read_text())
    assert labels.count('class="warn"') == len(stats["warnings"])  # every warning of label_stats.json, once
    assert labels.count("<img ") == 1 and "P(b | a)" in labels  # the co-occurrence heatmap
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("data:", "#")) for s in sources), [s[:40] for s in sources]
    assert "url(" not in html and "@import" not in html and "<script" not in html
    assert html.count("<img ") == len(re.findall(r'<img src="data:image/(?:png|jpeg);base64,', html))
    assert html.count("<img ") >= 3 * 6 + 3  # 3 samples x (image, 2 maps, 2 masks, GT) + plots
    assert len(html) < 2_000_000


def test_report_stage_skips_when_up_to_date_and_reruns_on_change(small_run, caplog):
    run, path = small_run
    caplog.set_level("INFO")
    assert main(["report", "--config", str(path)]) == 0
    assert "report: up to date, skipped" in caplog.text
    caplog.clear()
    assert main(["report", "--config", str(path), "--set", "report.samples=2"]) == 0
    assert "up to date" not in caplog.text
    assert (run / "report.html").read_text().count('class="cap"') == 2 + 2  # samples and review queue
    assert main(["report", "--config", str(path)]) == 0  # back to the fixture's report


def test_report_shows_a_segmenter_only_when_metrics_has_one(small_run, tmp_path):
    run, path = small_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    cfg = load_config(path, {"run_dir": str(copy)})
    metrics = json.loads((copy / "metrics.json").read_text())
    per_class = {name: {"iou": 0.5, "precision": 0.5, "recall": 0.5} for name in metrics["maps"]["cam"]["per_class"]}
    metrics["segmenter"] = {"split": "val", "miou": 0.41, "upper_bound_miou": 0.5, "ratio": 0.82,
                            "models": {"segmenter": {"masks": "pseudo", "miou": 0.41, "per_class": per_class},
                                       "segmenter_gt": {"masks": "gt", "miou": 0.5, "per_class": per_class}}}
    write_json(copy / "metrics.json", metrics)
    write_json(copy / "segmenter_log.json", [{"epoch": 1, "loss": 1.0, "val_miou": 0.3},
                                             {"epoch": 2, "loss": 0.7, "val_miou": 0.41}])
    html = build_report(cfg, maps_dataset(cfg))
    assert '<section id="segmenter"><h2>Segmenter</h2>' in html
    assert "0.410" in html and "0.8200" in html and "segmenter_log.json" in html
    assert "<th>segmenter (val)</th>" in html and "<th>segmenter_gt (val)</th>" in html  # per-class IoU columns


def test_report_shows_the_salient_objects_and_the_things_reading(small_run, tmp_path):
    """saliency.enabled on the small run: the saliency stage, then refine through the prior, write saliency/ and
    things.json; the report shows a salient-objects column in Samples and the reading in the labels section."""
    run, path = small_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    over = ["--set", f"run_dir={copy}", "saliency.enabled=true"]
    for stage in ("saliency", "refine"):
        assert main([stage, "--config", str(path), *over]) == 0, stage
    cfg = load_config(path, {"run_dir": str(copy), "saliency.enabled": True})
    things = json.loads((copy / "things.json").read_text())
    assert list(things) == maps_dataset(cfg).classes
    html = build_report(cfg, maps_dataset(cfg))
    samples = html.split('<section id="samples">')[1].split("</section>")[0]
    assert "<th>salient objects</th>" in samples and samples.count("salient objects</") == 1
    labels = html.split('<section id="labels">')[1].split("</section>")[0]
    assert "things.json" in labels
    for c, v in things.items():  # one row per class: its reading and its share of pairings won
        assert f'<td class="k">{c}</td><td>{v["kind"]}</td><td class="n">{v["win_rate"]:.2f}</td>' in labels


def test_report_warns_of_unreliable_classes_and_shows_iou_beside_confidence(small_run, tmp_path):
    run, path = small_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    cfg = load_config(path, {"run_dir": str(copy)})
    manifest = json.loads((copy / "pseudo_masks" / "manifest.json").read_text())
    weak = sorted(manifest["confidence"]["per_class"])[0]
    manifest["confidence"]["per_class"] = {c: 0.12 if c == weak else 0.9 for c in manifest["confidence"]["per_class"]}
    manifest["confidence"]["unreliable"] = [weak]
    write_json(copy / "pseudo_masks" / "manifest.json", manifest)
    html = build_report(cfg, maps_dataset(cfg))
    section = html.split('<section id="confidence">')[1].split("</section>")[0]
    assert section.count('class="warn"') == 1 and f"⚠ {weak}: confidence 0.12" in section
    assert "IoU (GT)" in section  # the synthetic set has GT: the exported set's IoU beside the confidence
    first_row = section.split("<tbody>")[1].split("</tr>")[0]
    assert weak in first_row and "unreliable" in first_row  # ranked first


def test_report_of_a_run_without_ground_truth(tiny_voc, tmp_path):
    root = tiny_voc(background=False)
    shutil.rmtree(root / "SegmentationClass")  # image-level labels only (labels.csv)
    cfg = {"run_dir": str(tmp_path / "run"), "device": "cpu", "data": {"kind": "voc", "root": str(root),
                                                                        "background": False},
           "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 1, "batch_size": 2},
           "maps": {"flip": False}, "refine": {"workers": "1", "refiners": ["threshold"]},
           "evaluate": {"faithfulness": {"steps": 4}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    run_stages(path)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "maps" not in metrics and metrics["faithfulness"]["cam"]["energy_pointing_game"] is None
    html = (tmp_path / "run" / "report.html").read_text()
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html
    assert "<th>GT</th>" not in html and html.count('class="cap"') == 3 + 3  # the 3 train images, no GT column
    # without GT the confidence is the quality figure: every class ranked, a warning per unreliable class, the queue
    summary = json.loads((tmp_path / "run" / "pseudo_masks" / "manifest.json").read_text())["confidence"]
    section = html.split('<section id="confidence">')[1].split("</section>")[0]
    ranked = sorted(summary["per_class"], key=summary["per_class"].get)
    positions = [section.index(f"</span>{c}</td>") for c in ranked]
    assert len(ranked) == 3 and positions == sorted(positions)  # least confident first
    assert section.count('class="warn"') == len(summary["unreliable"])
    assert "IoU (GT)" not in section and "No GT masks: these are the run's quality figures" in section
    assert section.count('class="cap"') == 3 and "disagreement" in section


def chromium_or_skip() -> None:
    """In CI (CI=true) Chromium and playwright must be there (.ci/run installs them): fail, never skip."""
    missing = [] if CHROMIUM.exists() else [f"{CHROMIUM} (Debian package chromium)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (dev extra)")
    if missing:
        message = "cannot test the report in a browser: missing " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def render(report: Path, tmp_path: Path) -> tuple[list, list, list, list, str]:
    """report.html in headless Chromium: (console errors, outside requests, images [alt, complete, width],
    section headings, the confidence section's text); a full-page screenshot in tmp_path/report.png."""
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:  # a fresh profile (user data dir) of its own
        context = p.chromium.launch_persistent_context(tmp_path / "profile", executable_path=str(CHROMIUM),
                                                       args=args, viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("data:", "file:")) else None)
            page.goto(report.resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            headings = page.evaluate("Array.from(document.querySelectorAll('section > h2')).map(h => h.textContent)")
            confidence = page.evaluate("document.querySelector('#confidence').innerText")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            context.close()
    return errors, requests, images, headings, confidence


def test_report_renders_in_headless_chromium(small_run, tmp_path):
    chromium_or_skip()
    run, _ = small_run
    errors, requests, images, headings, _ = render(run / "report.html", tmp_path)
    assert errors == [] and requests == []
    assert len(images) >= 3 * 6 + 3
    assert [alt for alt, complete, width in images if not complete or width == 0] == []
    assert set(SECTIONS.values()) <= set(headings)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_of_a_folder_dataset_without_masks_in_headless_chromium(tiny_voc, tmp_path):
    """A user's photos: a folder dataset (images/, labels.csv, classes.txt; no masks/). The report's main quality
    figures are then the confidence: the classes ranked, a warning per unreliable class, the review queue."""
    chromium_or_skip()
    voc = tiny_voc(background=False)
    root = tmp_path / "photos"
    shutil.copytree(voc / "JPEGImages", root / "images")
    shutil.copy(voc / "labels.csv", root / "labels.csv")
    shutil.copy(voc / "classes.txt", root / "classes.txt")
    cfg = {"run_dir": str(tmp_path / "run"), "device": "cpu",
           "data": {"kind": "folder", "root": str(root), "background": False, "val_split": ""},
           "classifier": {"backbone": "smallcnn", "input_size": 32, "epochs": 1, "batch_size": 2},
           "maps": {"flip": False, "split": "all"}, "refine": {"workers": "1", "refiners": ["threshold", "graphcut"]},
           "segmenter": {"enabled": False}, "evaluate": {"faithfulness": {"enabled": False}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    run_stages(path)
    summary = json.loads((tmp_path / "run" / "pseudo_masks" / "manifest.json").read_text())["confidence"]
    errors, requests, images, headings, text = render(tmp_path / "run" / "report.html", tmp_path)
    assert errors == [] and requests == []
    assert [alt for alt, complete, width in images if not complete or width == 0] == []
    assert "Confidence and review queue" in headings
    queue = [alt for alt, _, _ in images if alt.endswith("disagreement (1 other set)")]
    assert len(queue) == 4  # the 4 images, least confident first
    ranked = sorted(summary["per_class"], key=summary["per_class"].get)
    table = text.split("class\tconfidence")[1]
    assert [table.index(f"{c}\t") for c in ranked] == sorted(table.index(f"{c}\t") for c in ranked)
    assert text.count("⚠") == len(summary["unreliable"])
    assert "No GT masks: these are the run's quality figures" in text
