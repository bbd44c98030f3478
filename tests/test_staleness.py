"""Which stages a change makes stale: one row per change, on copies of one tiny finished run.

Each stage's fingerprint holds every input it reads and nothing it does not (pipeline/runfolder.py,
stages/common.py). A row changes one config key (or a few that go together), one input file, or redoes one stage
with --force, reruns every stage (``wsss all``), and checks exactly which ran; a second ``all`` then runs nothing.
A new row is one line in ``ROWS``: ``(change, the done markers expected to rerun)``, where a change is a dict of
dotted config keys, or an ``Edit``.

The run holds a stage of every kind: two map methods (cam, gradcam), three refiners, the affinity stage, a
decoupled round (its statistics bind cross to triangle), the segmenter and its GT twin, evaluate and the report.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import on_tiny
from PIL import Image

from pipeline.export import FORMAT_MARKER
from pipeline.maps.io import save_maps
from pipeline.models.backbones import create_backbone
from pipeline.runfolder import Stage, read_json, stage_fingerprint
from pipeline.stage_names import done_markers
from stages.cli import main
from tests.test_reliability_errors import CLASSES, TRAIN_LABELS, write_config

CONFIG = on_tiny({
    "device": "cpu",
    "data": {"kind": "synthetic", "synthetic": {"n_train": 24, "n_val": 4, "size": 32, "seed": 1}},
    "classifier": {"input_size": 32, "epochs": 1, "batch_size": 8},
    "maps": {"methods": ["cam", "gradcam"], "flip": False},
    "refine": {"workers": "1", "refiners": ["threshold", "crf", "graphcut"]},
    "affinity": {"enabled": True, "labels_from": ["crf", "graphcut"], "refiners": ["graphcut"], "epochs": 1,
                 "dim": 16, "steps": 4},
    "decouple": {"context": 0.5, "epochs": 1},
    "segmenter": {"backbone": "smallcnn", "pretrained": "none", "channels": 16, "atrous_rates": [1, 2, 3],
                  "input_size": 32, "crop_size": 32, "epochs": 1, "batch_size": 8},
    "evaluate": {"sweep": [0.3], "faithfulness": {"enabled": False}},
    "report": {"samples": 2},
})
ORDER = done_markers()  # every stage's done markers, in run order
OFF = {"saliency"}  # the stages CONFIG leaves off
EVERY = set(ORDER) - OFF  # the markers of the reference run
SCORED = {"evaluate", "report"}
SEGMENTER = {"train_segmenter"} | SCORED


def from_(stage: str) -> set[str]:
    """``stage`` and every stage after it, but the GT twin (it reads no maps, labels or pseudo-masks)."""
    return {s for s in ORDER[ORDER.index(stage):] if s in EVERY} - {"train_segmenter_gt"}


@dataclass
class Row:
    """One row's run folder: ``config`` (a dict, edited by the change), the dataset folder ``data``."""

    run: Path
    data: Path
    config: dict

    def config_path(self) -> Path:
        path = self.run.with_suffix(".yaml")
        path.write_text(yaml.safe_dump({**self.config, "run_dir": str(self.run)}))
        return path

    def set(self, edits: dict) -> None:
        for dotted, value in edits.items():
            *parents, last = dotted.split(".")
            node = self.config
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value

    def rerun(self, since: dict[str, tuple[int, bytes]] | None = None) -> set[str]:
        """Run every stage; the done markers written since ``since`` (``markers``; by default, now): a stage that
        is up to date leaves its marker alone."""
        before = markers(self.run) if since is None else since
        assert main(["all", "--config", str(self.config_path())]) == 0
        return {name for name, state in markers(self.run).items() if before.get(name) != state}


@dataclass(frozen=True)
class Edit:
    """A change other than config keys alone: ``apply`` edits files, the config or the run folder (and may run a
    stage: it counts as rerun). ``setup``: a change made and brought up to date before, not counted."""

    name: str
    apply: Callable[[Row], None]
    setup: dict | Edit | None = None

    def __repr__(self) -> str:
        return self.name


def ident(change: dict | Edit) -> str:
    return repr(change) if isinstance(change, Edit) else ",".join(f"{k}={v}" for k, v in change.items()) or "nothing"


def markers(run: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name.removesuffix(".done.json"): (p.stat().st_mtime_ns, p.read_bytes())
            for p in run.glob("*.done.json")}


def edit_pixel(rel: str) -> Edit:
    """One pixel of the dataset's file ``rel`` set to 255 (void in a mask)."""
    def apply(row: Row) -> None:
        path = row.data / rel
        im = Image.open(path)
        arr = np.array(im)
        arr[0, 0] = 255 - arr[0, 0]
        edited = Image.fromarray(arr, mode=im.mode)
        if im.mode == "P":
            edited.putpalette(im.getpalette())
        edited.save(path)

    return Edit(f"edit {rel}", apply)


def force(stage: str) -> Edit:
    """``wsss <stage> --force``: the stage redone over its own outputs."""
    return Edit(f"force {stage}", lambda row: main([stage, "--config", str(row.config_path()), "--force"]))


def after(setup: dict | Edit, change: dict | Edit) -> Edit:
    """``change`` on the run brought up to date with ``setup`` first."""
    return Edit(f"{ident(change)} after {ident(setup)}", lambda row: make(row, change), setup)


def make(row: Row, change: dict | Edit) -> None:
    change.apply(row) if isinstance(change, Edit) else row.set(change)


def weights(path: str) -> Edit:
    """``classifier.pretrained`` a weights file at ``path`` (under the run's folder), new random weights."""
    def apply(row: Row) -> None:
        file = row.run.parent / path
        torch.save(create_backbone("smallcnn").body.state_dict(), file)
        row.set({"classifier.pretrained": str(file)})

    return Edit(f"weights {path}", apply)


def correct_one(row: Row) -> None:
    """A corrected mask in <run>/corrections/ (as ``wsss import-masks`` leaves it): export takes it."""
    src = next(iter(sorted((row.run / "pseudo_masks" / "SegmentationClass").glob("*.png"))))
    label = np.array(Image.open(src))
    label[:4, :4] = 0
    (row.run / "corrections").mkdir(exist_ok=True)
    Image.fromarray(label).save(row.run / "corrections" / src.name)


ROWS = [
    ({}, set()),
    ({"name": "renamed"}, {"report"}),
    ({"report.samples": 3}, {"report"}),
    ({"evaluate.sweep": [0.2, 0.4]}, SCORED),
    ({"evaluate.faithfulness.steps": 8}, {"report"}),  # faithfulness is off: only the report shows its options
    ({"evaluate.faithfulness.enabled": True, "evaluate.faithfulness.limit": 4}, SCORED),
    ({"segmenter.crf": True}, SCORED),  # how predictions are post-processed: the same weights, scored anew
    ({"segmenter.test_scales": [1.0, 1.5]}, SCORED),
    ({"segmenter.upper_bound": False}, SCORED),
    ({"segmenter.lr": 0.002}, {"train_segmenter", "train_segmenter_gt"} | SCORED),
    ({"segmenter.workers": 1}, set()),  # loader workers: the same batches
    ({"saliency.batch_size": 2}, set()),  # the salient-object prior is off: its options are read by nothing
    ({"saliency.enabled": True}, {"saliency"} | from_("refine")),  # the maps and the classifier stay
    ({"export.images": "copy"}, {"export"}),  # links or copies of the images: the segmenter reads the dataset's
    ({"export.formats": ["voc", "coco"]}, set()),  # a format of its own, written from the current export
    ({"export.refiner": "graphcut_dc_rw"}, set()),  # the set that auto chose
    ({"export.refiner": "crf"}, from_("decouple")),  # the round's cut-outs come from the exported set
    (Edit("a corrected mask", correct_one), {"export"} | SEGMENTER),
    ({"decouple.epochs": 2}, from_("decouple")),
    ({"decouple.context": 0.95}, from_("decouple")),  # no class bound to a context: no round
    (after({"decouple.enabled": False}, {"decouple.epochs": 2}), set()),  # no round reads no round option
    (after({"decouple.context": 0.95}, {"decouple.paste_prob": 0.2}), set()),
    ({"affinity.beta": 8.0}, from_("affinity")),
    # the round refines its maps with refine.refiners now; the exported set (crf) is the same
    (after({"export.refiner": "crf"}, {"affinity.enabled": False}), {"decouple", "export"} | SCORED),
    ({"affinity.refiners": ["graphcut", "crf"]}, from_("affinity")),
    ({"refine.threshold.fg": 0.5}, {"refine", "export"} | SCORED),  # a set that only export's confidence reads
    ({"refine.refiners": ["crf", "graphcut"]}, {"refine", "export"} | SCORED),
    ({"refine.crf.iterations": 5}, from_("refine")),  # affinity learns from crf's set
    ({"refine.sam.min_score": 0.2}, set()),  # no sam in this run
    ({"refine.workers": "2"}, set()),
    (after({"segmenter.crf": True, "refine.refiners": ["threshold", "graphcut"], "affinity.labels_from": ["graphcut"]},
           {"refine.crf.iterations": 5}), SCORED),  # crf's kernels, read by evaluate alone
    ({"maps.methods": ["cam"]}, {"make_maps"} | SCORED),  # refine reads cam's maps, unchanged
    ({"maps.smoothgrad.n": 4, "maps.scorecam.chunk": 8}, set()),  # options of methods not in maps.methods
    ({"maps.visualizations": ["class_model"], "maps.class_model.steps": 2}, {"make_maps"} | SCORED),
    ({"maps.flip": True}, from_("make_maps")),
    ({"maps.limit": 20}, from_("make_maps") | {"train_segmenter_gt"}),  # the images: the twin trains on them too
    ({"classifier.lr": 0.002}, from_("train_classifier")),
    ({"classifier.acol.delta": 0.5}, set()),  # options of a model not used
    ({"classifier.workers": 1}, set()),
    (weights("smallcnn.pt"), from_("train_classifier")),
    (after(weights("smallcnn.pt"), weights("smallcnn.pt")), from_("train_classifier")),  # same path, new contents
    ({"seed": 1}, EVERY),
    ({"data.val_fraction": 0.5, "data.coco.masks": "elsewhere/{split}"}, set()),  # other layouts' options
    ({"ray.num_cpus": 1}, set()),
    (edit_pixel("SegmentationClass/syn_00000.png"), {"train_segmenter_gt"} | SCORED),  # a train GT mask
    (edit_pixel("SegmentationClass/syn_00025.png"), {"train_segmenter", "train_segmenter_gt"} | SCORED),  # val
    (edit_pixel("JPEGImages/syn_00000.png"), EVERY),  # a train image
    (edit_pixel("JPEGImages/syn_00025.png"), EVERY),  # a val image: val mAP, the segmenters' val mIoU
    (force("evaluate"), SCORED),
    (force("train_segmenter"), {"train_segmenter", "train_segmenter_gt"} | SCORED),
    (force("export"), {"export"} | SEGMENTER),  # not the GT twin: it reads no pseudo-mask
    (force("refine"), from_("refine")),
    (force("make_maps"), from_("make_maps")),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Row:
    """The finished run every row starts from, and a snapshot of its dataset's files (bytes and times)."""
    base = tmp_path_factory.mktemp("staleness")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    row = Row(base / "ref", base / "data", copy.deepcopy(CONFIG))
    row.set({"data.root": str(row.data)})
    try:
        assert row.rerun() == EVERY
        decoupled = read_json(row.run / "decouple.json")
        assert list(decoupled["classes"]) == ["cross"], decoupled  # a round, so that its rows mean something
        yield row
    finally:
        torch.set_num_threads(threads)


def snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("change", "expected"), ROWS, ids=[ident(c) for c, _ in ROWS])
def test_a_change_reruns_exactly_the_stages_that_read_it(reference, tmp_path, change, expected):
    row = Row(tmp_path / "run", reference.data, copy.deepcopy(reference.config))
    shutil.copytree(reference.run, row.run, symlinks=True)
    data = snapshot(reference.data)
    try:
        if isinstance(change, Edit) and change.setup is not None:
            make(row, change.setup)
            row.rerun()
        before = markers(row.run)
        make(row, change)
        assert row.rerun(since=before) == expected
        assert row.rerun() == set()
    finally:  # the dataset as it was, times too (its fingerprint holds them)
        for path, (content, mtime) in data.items():
            if path.read_bytes() != content:
                path.write_bytes(content)
            os.utime(path, ns=(mtime, mtime))


def test_loader_workers_give_the_same_weights(reference, tmp_path):
    """``classifier.workers`` and ``segmenter.workers`` are left out of the fingerprints: with loader workers the
    classifier and the segmenter train to the same bytes."""
    row = Row(tmp_path / "run", reference.data, copy.deepcopy(reference.config))
    shutil.copytree(reference.run, row.run, symlinks=True)
    row.set({"classifier.workers": 2, "segmenter.workers": 2})
    for stage in ("train_classifier", "train_segmenter"):
        assert main([stage, "--config", str(row.config_path()), "--force"]) == 0
    for name in ("classifier.pt", "segmenter.pt", "segmenter_gt.pt"):
        ours, theirs = (torch.load(run / name, weights_only=False)["state_dict"] for run in (reference.run, row.run))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_export_images_redoes_the_export_and_leaves_its_identities_alone(tiny_voc, tmp_path):
    """``export.images`` (links or copies of the JPEG sources) changes only the export's own files: the VOC export
    and the other formats are written again, and the identities that later stages read stay as they were."""
    root, run = tiny_voc(True), tmp_path / "run"
    rng = np.random.default_rng(0)
    for i, labels in TRAIN_LABELS.items():
        maps = rng.random((len(labels), 6, 8)).repeat(4, axis=1).repeat(4, axis=2).astype(np.float32)
        save_maps(run / "maps" / "cam" / f"{i}.npz", maps, labels, CLASSES)
    cfg = write_config(tmp_path / "c.yaml", root, run, export={"formats": ["voc", "coco"]})
    assert main(["refine", "--config", str(cfg)]) == 0

    def export(images: str) -> tuple[str, str | None, str | None, list[Path]]:
        assert main(["export", "--config", str(cfg), "--set", f"export.images={images}"]) == 0
        links = [p for p in (*run.glob("pseudo_masks/**/*"), *run.glob("exports/**/*")) if p.is_symlink()]
        return (read_json(run / "export.done.json")["fingerprint"], stage_fingerprint(run, "export"),
                stage_fingerprint(run, "export", "masks"), links)

    fp, identity, masks, links = export("link")
    assert len(links) == 2 * len(TRAIN_LABELS)  # the VOC export's and the COCO export's
    again, identity_again, masks_again, links_again = export("copy")
    assert again != fp and (identity_again, masks_again) == (identity, masks) and links_again == []
    for i in TRAIN_LABELS:
        assert (run / "pseudo_masks" / "JPEGImages" / f"{i}.jpg").read_bytes() == (root / "JPEGImages" / f"{i}.jpg"
                                                                                    ).read_bytes()
    assert read_json(run / "exports" / "coco" / FORMAT_MARKER)["fingerprint"] == again


# ------------------------------------------------------------------------------------ identities (runfolder)


def test_a_redone_stage_gets_a_new_identity_and_keeps_it_when_resumed(tmp_path):
    """A stage's identity, which the stages after it take as an input: its fingerprint on a first run (the same in
    any run folder); a new one when it is redone over its own outputs, interrupted and resumed or not."""
    def run(fp: str, fresh: bool = False, finish: bool = True) -> str | None:
        stage = Stage(tmp_path, "a", fp)
        stage.begin(fresh=fresh)
        if finish:
            stage.finish()
        return stage_fingerprint(tmp_path, "a")

    assert run("fp1") == "fp1"
    first_redo = run("fp1", fresh=True)
    assert first_redo.startswith("fp1.") and run("fp1", fresh=True) not in {"fp1", first_redo}
    assert run("fp1", fresh=True, finish=False) is None  # --force, interrupted
    resumed = run("fp1")
    assert resumed.startswith("fp1.") and resumed != first_redo
    assert run("fp2") == "fp2"  # another fingerprint: a first run of it


def test_a_part_keeps_its_identity_while_another_part_or_a_local_input_changes(tmp_path):
    """Parts: each has an identity made from its own inputs; a rerun for another part, or for a ``local`` input,
    leaves it (and, for a local input, the stage's identity) as it was; a redo gives every identity a new token."""
    def run(parts: dict[str, str], local: str = "link", fresh: bool = False, finish: bool = True) -> dict:
        stage = Stage(tmp_path, "a", "fp", parts, local)
        assert not stage.is_done() or fresh
        stage.begin(fresh=fresh)
        if finish:
            stage.finish()
        return {"a": stage_fingerprint(tmp_path, "a"), **{p: stage_fingerprint(tmp_path, "a", p) for p in parts}}

    first = run({"p": "1", "q": "2"})
    assert (first["p"], first["q"]) == ("1", "2") and "." not in first["a"]
    assert stage_fingerprint(tmp_path, "a", "other") == first["a"]  # a part it does not record: the whole
    copied = run({"p": "1", "q": "2"}, local="copy")
    assert copied == first  # a local input: the same identities
    q_changed = run({"p": "1", "q": "3"}, local="copy")
    assert q_changed["p"] == "1" and q_changed["q"] == "3" and q_changed["a"] != first["a"]
    redone = run({"p": "1", "q": "3"}, local="copy", fresh=True)
    token = redone["a"].split(".")[1]
    assert redone == {"a": f"{q_changed['a']}.{token}", "p": f"1.{token}", "q": f"3.{token}"}
    four = run({"p": "1", "q": "4"}, local="copy")
    assert four["p"] == f"1.{token}" and four["q"] == "4" and "." not in four["a"]  # p: the redone outputs' identity
    run({"p": "1", "q": "4"}, local="copy", fresh=True, finish=False)  # a redo, interrupted ...
    begun = read_json(tmp_path / "a.partial.json")
    resumed = run({"p": "1", "q": "4"}, local="copy")  # ... and resumed: the identities it began with
    assert resumed == {"a": begun["identity"], **begun["parts"]} and resumed["q"].startswith("4.")
