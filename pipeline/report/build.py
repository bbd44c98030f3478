"""The sections of report.html, each from what the run folder holds (a missing input leaves a note, not an
error): the dataset, the confidence of the pseudo-masks and the review queue (pipeline/report/confidence.py), the
classifier, methods x mIoU x faithfulness, pseudo-masks and baselines, the
segmenter (only when metrics.json has one), per-class IoU, curves, sample grids, class model
visualisations, time per stage."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import pipeline.report.figures as fg
from pipeline.data import read_image, read_mask, spread
from pipeline.errors import DataError, UserError
from pipeline.maps.io import load_maps
from pipeline.refine import label_sets
from pipeline.report.confidence import confidence_section
from pipeline.report.html import (
    cards,
    e,
    figure,
    fmt,
    grid,
    img,
    key,
    note,
    num,
    page,
    swatch,
    table,
)
from pipeline.runfolder import read_json, stage_seconds
from pipeline.saliency import FOLDER as SALIENCY_FOLDER
from pipeline.saliency import THINGS_FILE
from pipeline.saliency import read_map as read_saliency
from pipeline.stage_names import done_markers

# In pipeline order; other stages (added later) follow in the order of their done markers.
STAGE_ORDER = done_markers()
# metrics.json faithfulness keys: (column, better = higher?, in %?)
FAITHFULNESS = {"average_drop": ("Avg Drop ↓", False, True), "increase_in_confidence": ("Incr. Conf. ↑", True, True),
                "deletion_auc": ("Deletion AUC ↓", False, False), "insertion_auc": ("Insertion AUC ↑", True, False),
                "energy_pointing_game": ("Energy PG ↑", True, False)}


def _json(path: Path) -> Any:
    try:
        return read_json(path) if path.exists() else None
    except (OSError, ValueError):
        return None


def _best(values: list[float | None], higher: bool) -> float | None:
    vals = [v for v in values if isinstance(v, int | float) and not math.isnan(v)]
    if len(vals) < 2:
        return None
    return max(vals) if higher else min(vals)


def _iou_cell(v: float | None) -> str:
    if v is None:
        return num(None)
    return num(v, style=f"background: rgba(46, 139, 87, {0.08 + 0.6 * v:.2f})")


class ReportBuilder:
    """Reads a run folder (``cfg.run_path``) and the maps' images (``ds``) and writes one HTML string."""

    def __init__(self, cfg, ds, metrics: dict[str, Any]):
        self.cfg, self.ds, self.metrics = cfg, ds, metrics
        self.run = Path(cfg.run_path)
        self.opts = cfg.report
        self.methods = list(cfg.maps.methods)
        self.refiners = list(label_sets(cfg))
        self.colours = fg.label_colours(ds.background)

    # ------------------------------------------------------------------------------------------ page
    def html(self) -> str:
        sections = [("dataset", "Dataset", self.dataset()), ("labels", "What the labels can teach", self.labels()),
                    ("confidence", "Confidence and review queue", confidence_section(self)),
                    ("classifier", "Classifier", self.classifier()),
                    ("methods", "Methods: mIoU and faithfulness", self.methods_table()),
                    ("pseudo-masks", "Pseudo-masks and baselines", self.pseudo_masks())]
        if self.metrics.get("segmenter"):
            sections.append(("segmenter", "Segmenter", self.segmenter()))
        sections += [("per-class", "Per-class IoU", self.per_class()), ("curves", "Curves", self.curves()),
                     ("samples", "Samples", self.samples()), ("class-model", "Class model visualisations",
                                                              self.class_model()),
                     ("time", "Time per stage", self.time())]
        d = self.cfg.data
        subtitle = (f"config <b>{e(self.cfg.name)}</b> · run folder <code>{e(self.run)}</code> · data "
                    f"<code>{e(d.root)}</code> ({e(d.kind)}) · device {e(self.cfg.device)}")
        return page(f"WSSS run report: {self.cfg.name}", subtitle, sections)

    # --------------------------------------------------------------------------------------- dataset
    def dataset(self) -> str:
        ds, d = self.ds, self.cfg.data
        with_gt = sum(1 for s in ds.samples if s.mask_path)
        counts = Counter(c for s in ds.samples for c in s.labels)
        per_image = np.mean([len(s.labels) for s in ds.samples]) if ds.samples else float("nan")
        limit = f", limit {self.cfg.maps.limit}" if self.cfg.maps.limit is not None else ""
        out = cards([("classes" + (" + background" if ds.background else ""), str(ds.num_classes)),
                     (f"images with maps ({self.cfg.maps.split}{limit})", str(len(ds))),
                     ("of them with GT masks", str(with_gt)), ("classes per image", fmt(per_image, 2))])
        chips = " ".join(f'<span class="cls">{swatch(self.colours[ds.label_of(i)], f"{c} ({counts.get(i, 0)})")}'
                         f"</span>" for i, c in enumerate(ds.classes))
        if ds.background:
            chips = f'<span class="cls">{swatch(self.colours[0], "background")}</span> ' + chips
        out += f"<p>{chips}</p>" + note(
            f"Image-level label counts over the {len(ds)} images that get maps, with each class's colour in the "
            f"masks below. Splits: train <code>{e(d.train_split)}</code>, val <code>{e(d.val_split)}</code>; "
            f"{'mask index 0 is background' if ds.background else 'no background class'}.")
        return out

    # ---------------------------------------------------------------------------------------- labels
    def labels(self) -> str:
        stats = _json(self.run / "label_stats.json")
        if not isinstance(stats, dict):
            return note("No label statistics (label_stats.json: the train_classifier stage writes them).")
        warnings = stats.get("warnings") or []
        out = "".join(f'<p class="warn">⚠ {e(w["message"])}</p>' for w in warnings) or note(
            "No warning: every class has enough training images, none is in nearly every image, and no class is "
            "hardly ever seen without another one.")
        decoupled = _json(self.run / "decouple.json")
        if isinstance(decoupled, dict) and decoupled.get("classes"):
            bank = decoupled.get("bank") or {}
            rows = [[key(a), f"<td>{e(', '.join(ctx))}</td>", num((bank.get(a) or {}).get("cut_outs", 0), 0)]
                    for a, ctx in decoupled["classes"].items()]
            out += table(["class", "its context", "cut-outs"], rows) + note(
                f"The decoupled second round (stage <code>decouple</code>) pasted these classes' cut-outs from "
                f"<code>{e(decoupled.get('source'))}</code> onto images without their context; its label sets end in "
                f"<code>_dc</code>.")
        out += self.things()
        classes = list(stats.get("classes") or {})
        if classes:
            conditional = [[stats["conditional"][a][b] for b in classes] for a in classes]
            out += figure(fg.cooccurrence_plot(classes, conditional), "label co-occurrence heatmap",
                          f"P(b | a) over the {stats.get('images')} training images: row a, column b. A row with "
                          "a bright cell off the diagonal is a class that is rarely seen without that column's class.")
        return out

    def things(self) -> str:
        """The thing / stuff reading of the salient-object prior (things.json), when the run has one."""
        things = _json(self.run / THINGS_FILE)
        if not isinstance(things, dict):
            return ""
        order = {"thing": 0, "either": 1, "stuff": 2}
        rows = [[key(c), f"<td>{e(v['kind'])}</td>", num(v["win_rate"], 2), num(v["pairs"], 0)]
                for c, v in sorted(things.items(), key=lambda cv: (order[cv[1]["kind"]], -cv[1]["win_rate"]))]
        return table(["class", "reading", "pairings won", "pairings"], rows) + note(
            "Things and stuff, read from this run's maps and the salient-object maps (<code>saliency.enabled</code>, "
            "<code>things.json</code>): in every image, each pair of labelled classes is compared by how much of each "
            "one's map lies on salient pixels. A class that wins its pairings more often than chance is a thing: on "
            "the salient objects its things claim, a thing keeps its map and a stuff class loses it before any "
            "refiner runs. A class read as <i>either</i> keeps its map. Results with this prior are "
            "saliency-supervised: the salient-object model was trained with pixel labels on another dataset.")

    # ------------------------------------------------------------------------------------ classifier
    def classifier(self) -> str:
        c = self.cfg.classifier
        val_map = (self.metrics.get("classifier") or {}).get("val_map")
        history = _json(self.run / "train_log.json") or []
        out = cards([("val mAP (last epoch)", fmt(val_map)), ("model", e(c.model)), ("backbone", e(c.backbone)),
                     ("epochs", str(len(history) or c.epochs)), ("input size", f"{c.input_size} px")])
        out += note(f"pretrained <code>{e(c.pretrained)}</code>, batch {c.batch_size}, lr {c.lr:g} "
                    f"(backbone × {c.backbone_lr_mult:g}), weight decay {c.weight_decay:g}.")
        plot = fg.history_plot(history, "classifier training") if history else None
        out += figure(plot, "classifier training curves", "loss and validation mAP per epoch") if plot else note(
            "No training log (train_log.json) in the run folder.")
        return out

    # ---------------------------------------------------------------------------------- methods table
    def methods_table(self) -> str:
        maps = self.metrics.get("maps") or {}
        faith = self.metrics.get("faithfulness") or {}
        methods = [m for m in dict.fromkeys([*self.methods, *maps, *faith])]
        if not methods:
            return note("No per-image map method in this run.")
        miou_best = _best([maps.get(m, {}).get("miou") for m in methods], True)
        best = {k: _best([faith.get(m, {}).get(k) for m in methods], hi) for k, (_, hi, _) in FAITHFULNESS.items()}
        rows, classes = [], []
        for m in methods:
            r, f = maps.get(m, {}), faith.get(m, {})
            thr = r.get("threshold")
            row = [key(m), num(r.get("miou"), bold=r.get("miou") == miou_best and miou_best is not None),
                   num(r.get("mean_recall")), f"<td>{'argmax' if r and thr is None else fmt(thr, 2)}</td>"]
            for k, (_, _, pct) in FAITHFULNESS.items():
                v = f.get(k)
                row.append(num(v, 1 if pct else 3, pct, bold=v is not None and v == best[k]))
            row.append(num(f.get("pairs"), 0))
            rows.append(row)
            classes.append("best" if miou_best is not None and r.get("miou") == miou_best else "")
        header = ["method", "mIoU", "mean recall", "threshold", *(c for c, _, _ in FAITHFULNESS.values()), "pairs"]
        out = table(header, rows, classes)
        fc = self.cfg.evaluate.faithfulness
        gt_note = "" if maps else " No GT masks: mIoU and the pointing game are not scored."
        out += note(
            "mIoU against GT at the best background threshold of the sweep (with a background class) or the argmax "
            "over each image's classes (without); ★ = best mIoU, bold = best of a column. Faithfulness "
            f"(<code>evaluate.faithfulness</code>: {fc.limit if fc.limit is not None else 'all'} images, "
            f"{fc.steps} steps) over (image, class) pairs, p = the classifier's class probability: "
            "<b>Avg Drop</b> = mean max(0, Y − O)/Y with Y = p(image), O = p(image × map), "
            "<b>Incr. Conf.</b> = % of pairs with O &gt; Y; <b>deletion / insertion AUC</b>: area under p as "
            f"pixels are removed to {e(fc.deletion_base)} / revealed from a {e(fc.insertion_base)} image in map "
            "order (RISE); <b>Energy PG</b>: share of the map's energy inside the class's GT mask." + gt_note)
        return out

    # --------------------------------------------------------------------------- pseudo-masks, baselines
    def pseudo_masks(self) -> str:
        pm, bl = self.metrics.get("pseudo_masks") or {}, self.metrics.get("baselines") or {}
        if not pm and not bl:
            return note("No GT masks for the maps' images: pseudo-masks and baselines are not scored.")
        manifest = _json(self.run / "pseudo_masks" / "manifest.json") or {}
        exported = manifest.get("refiner")
        best = _best([r.get("miou") for r in pm.values()], True)
        rows, classes = [], []
        for name, r in pm.items():
            rows.append([key(name), f"<td>{e(r.get('maps', ''))}</td>", num(r.get("miou"), bold=r.get("miou") == best),
                         num(r.get("mean_recall")), num(r.get("pixel_accuracy")),
                         num(100 * r["ignore_ratio"] if r.get("ignore_ratio") is not None else None, 1, True),
                         f"<td>{'exported' if name == exported else ''}</td>"])
            classes.append("best" if best is not None and r.get("miou") == best else "")
        out = table(["refiner", "from maps", "mIoU", "mean recall", "pixel accuracy", "ignored", ""], rows, classes)
        out += note("Pixels a refiner marks 255 (ignored) count as misses for their GT class.")
        if bl:
            out += "<h3>Baselines</h3>" + table(
                ["baseline", "mIoU", "mean recall", "pixel accuracy"],
                [[key(n), num(r.get("miou")), num(r.get("mean_recall")), num(r.get("pixel_accuracy"))]
                 for n, r in bl.items()])
            out += note("<code>background</code> / <code>most_frequent</code>: one label everywhere; "
                        "<code>all_present</code>: every present class painted over the whole image.")
        return out

    # ------------------------------------------------------------------------------------- segmenter
    def segmenter(self) -> str:
        seg = self.metrics["segmenter"]
        scalars = [(k, v) for k, v in seg.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        out = table(["score", "value"], [[key(k.replace("_", " ")), num(v, 4 if "ratio" in k else 3)]
                                         for k, v in scalars])
        if seg.get("split"):
            out += note(f"Scored on the <code>{e(seg['split'])}</code> split's GT masks. <b>ratio</b> = the segmenter "
                        "trained on pseudo-masks over its twin trained on GT masks (the upper bound).")
        figs = []
        for name in ("segmenter", "segmenter_gt"):
            history = _json(self.run / f"{name}_log.json")
            if isinstance(history, dict):
                history = history.get("history")
            plot = fg.history_plot(history, f"{name} training") if isinstance(history, list) else None
            if plot:
                figs.append(figure(plot, f"{name} training curves", f"{name}_log.json"))
        return out + (f'<div class="figs">{"".join(figs)}</div>' if figs else "")

    # ------------------------------------------------------------------------------------- per class
    def per_class(self) -> str:
        cols = [(f"maps/{m}", r) for m, r in (self.metrics.get("maps") or {}).items()]
        cols += [(f"pseudo/{n}", r) for n, r in (self.metrics.get("pseudo_masks") or {}).items()]
        seg = self.metrics.get("segmenter") or {}
        models = seg.get("models") if isinstance(seg.get("models"), dict) else {}
        for name, r in models.items():  # the segmenter and its GT twin, scored on another split
            if isinstance(r, dict):
                cols.append((f"{name} ({seg.get('split', 'val')})", r))
        cols = [(n, r) for n, r in cols if r.get("per_class")]
        if not cols:
            return note("No GT masks: no per-class scores.")
        names = list(cols[0][1]["per_class"])
        rows = []
        for i, c in enumerate(names):
            colour = self.colours[i] if i < 255 else (255, 255, 255)
            rows.append([f"<td class=\"k\">{swatch(colour, c)}</td>",
                         *(_iou_cell((r["per_class"].get(c) or {}).get("iou")) for _, r in cols)])
        rows.append([key("mIoU"), *(num(r.get("miou"), bold=True) for _, r in cols)])
        return table(["class", *(n for n, _ in cols)], rows) + note(
            "IoU per class (greener = higher); a dash: the class is in neither the GT nor the prediction. "
            "Precision and recall per class are in per_class.md.")

    # ---------------------------------------------------------------------------------------- curves
    def curves(self) -> str:
        figs = []
        sweep = fg.sweep_plot(self.metrics.get("maps") or {})
        if sweep:
            figs.append(figure(sweep, "threshold sweep", "mIoU of each method's maps against the background "
                                                         "threshold (dashed: the best)"))
        faith = fg.faithfulness_plot(self.metrics.get("faithfulness") or {})
        if faith:
            figs.append(figure(faith, "deletion and insertion curves",
                               "mean class probability as pixels are removed (deletion) or revealed (insertion) "
                               "in the order of the map; AUC in the legend"))
        if not figs:
            return note("No curves: no threshold sweep (a dataset without background class is scored by argmax) and "
                        "no faithfulness results.")
        out = f'<div class="figs">{"".join(figs)}</div>'
        if not sweep:
            out += note("No threshold sweep: without a background class the maps are scored by their argmax.")
        return out

    # --------------------------------------------------------------------------------------- samples
    def samples(self) -> str:
        ds, opts = self.ds, self.opts
        methods = [m for m in self.methods if (self.run / "maps" / m).is_dir()]
        refiners = [r for r in self.refiners if (self.run / "refined" / r).is_dir()]
        chosen = spread(list(ds.samples), opts.samples)
        if not chosen:
            return note("No images.")
        has_gt = any(s.mask_path for s in chosen)
        salient = (self.run / SALIENCY_FOLDER).is_dir()
        header = ["image", *(["salient objects"] if salient else []), *(f"map: {m}" for m in methods),
                  *(f"mask: {r}" for r in refiners),
                  *(["GT"] if has_gt else [])]
        width = max(64, min(opts.thumb, 1300 // len(header) - 6))
        rows = []
        for s in chosen:
            image = read_image(s.image_path)
            size = fg.tile_size(image.shape[:2], opts.thumb)
            small = fg.resize(image, size)
            gt = read_mask(s.mask_path) if s.mask_path else None
            shown = self._shown_class(s, gt)
            tiles = [fg.jpeg_uri(small, opts.jpeg_quality)]
            if salient:
                try:
                    sal = fg.resize(read_saliency(self.run, s.id, image.shape[:2]), size)
                    tiles.append(fg.jpeg_uri(fg.heat_overlay(small, sal), opts.jpeg_quality))
                except DataError:
                    tiles.append(None)
            for m in methods:
                try:
                    maps, classes = load_maps(self.run / "maps" / m / f"{s.id}.npz", ds.classes)
                except DataError:
                    tiles.append(None)
                    continue
                k = list(classes).index(shown) if shown in classes else None
                heat = fg.resize(maps[k], size) if k is not None else np.zeros(size[::-1], np.float32)
                tiles.append(fg.jpeg_uri(fg.heat_overlay(small, heat), opts.jpeg_quality))
            for r in refiners:
                path = self.run / "refined" / r / f"{s.id}.png"
                tiles.append(self._label_tile(small, read_mask(path), size) if path.exists() else None)
            if has_gt:
                tiles.append(self._label_tile(small, gt, size) if gt is not None else None)
            alts = [f"{s.id} {h}" for h in header]
            scale = width / max(image.shape[:2])  # shown with the longer side ``width`` pixels
            dw, dh = round(image.shape[1] * scale), round(image.shape[0] * scale)
            cells = "".join(f"<td>{img(t, a, width=dw, height=dh)}</td>" if t else
                            f'<td class="note">{e("missing")}</td>' for t, a in zip(tiles, alts, strict=True))
            legend = " ".join(swatch(self.colours[ds.label_of(c)], ds.classes[c]) for c in s.labels)
            cap = (f"<b>{e(s.id)}</b> · maps of <b>{e(ds.classes[shown])}</b> · labels: {legend}")
            rows.append((cap, cells))
        return grid(header, rows) + note(
            f"{len(chosen)} images spread over the {len(ds)} with maps (<code>report.samples</code>). "
            + ("Salient objects: the salient-object map (saliency/) over the image. " if salient else "")
            + "Maps: the named class's map over the image (jet: blue 0 → red 1). Masks and GT: each class in its colour"
            + (", background dimmed" if ds.background else "") + ", ignored pixels (255) whitened.")

    def _shown_class(self, s, gt: np.ndarray | None) -> int:
        """The class whose maps a sample row shows: the one with the smallest GT area (objects rather than
        stuff), or the first label without GT."""
        labels = list(s.labels)
        if gt is None or not labels:
            return labels[0] if labels else 0
        areas = {c: int((gt == self.ds.label_of(c)).sum()) for c in labels}
        present = [c for c in labels if areas[c] > 0]
        return min(present, key=lambda c: areas[c]) if present else labels[0]

    def _label_tile(self, small: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> str:
        label = fg.resize(label, size, nearest=True)
        return fg.jpeg_uri(fg.label_overlay(small, label, self.colours, self.ds.background), self.opts.jpeg_quality)

    # ----------------------------------------------------------------------------------- class model
    def class_model(self) -> str:
        png, scores = self.run / "maps" / "class_model.png", _json(self.run / "maps" / "class_model.json")
        if not png.exists():
            return note("Not made in this run: add <code>class_model</code> to <code>maps.visualizations</code> "
                        "(Simonyan et al. 2014: an image that maximises each class's score).")
        out = figure(fg.image_uri(png, 88, max_side=1300), "class model visualisations",
                     "gradient ascent on S_c(I) − λ‖I‖² from the mean image, one tile per class")
        if isinstance(scores, dict) and scores:
            out += table(["class", *scores], [
                [key("score before"), *(num(v.get("initial"), 2) for v in scores.values())],
                [key("score after"), *(num(v.get("final"), 2) for v in scores.values())]])
        return out

    # ------------------------------------------------------------------------------------------ time
    def time(self) -> str:
        seconds = stage_seconds(self.run)
        seconds.pop("report", None)
        order = [s for s in STAGE_ORDER if s in seconds] + [s for s in seconds if s not in STAGE_ORDER]
        if not order:
            return note("No finished stage recorded.")
        total = sum(seconds[s] for s in order)
        faith = (self.metrics.get("timing_s") or {}).get("faithfulness")
        rows = []
        for s in order:
            v = seconds[s]
            bar = f'<span class="bar" style="width:{max(1, round(300 * v / max(total, 1e-9)))}px"></span>'
            rows.append([key(s), num(v, 1), num(100 * v / max(total, 1e-9), 1, True), f"<td>{bar}</td>"])
            if s == "evaluate" and faith is not None:
                rows.append(['<td class="k note">&nbsp;&nbsp;of which faithfulness</td>', num(faith, 1),
                             num(100 * faith / max(total, 1e-9), 1, True), "<td></td>"])
        rows.append([key("total"), num(total, 1), num(100.0, 1, True), "<td></td>"])
        return table(["stage", "seconds", "share", ""], rows) + note(
            "Wall-clock seconds of each stage's last run (from <code>&lt;stage&gt;.done.json</code>); a stage that was "
            "skipped as up to date keeps the time of the run that made its outputs.")


def build_report(cfg, ds) -> str:
    """report.html for the run of ``cfg`` (its metrics.json must exist), ``ds`` the maps' images."""
    path = Path(cfg.run_path) / "metrics.json"
    metrics = _json(path)
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: not found or unreadable (run the evaluate stage first)")
    return ReportBuilder(cfg, ds, metrics).html()
