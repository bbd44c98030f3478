"""mmsegmentation export: ``exports/mmseg/img_dir/train/<id>.jpg``, ``ann_dir/train/<id>.png`` and
``dataset.py``, a dataset config (mmseg 1.x, ``BaseSegDataset``, as its ``configs/_base_/datasets/`` files) that
reads them as they are.

The annotation PNGs hold the label maps' values unchanged: one index per pixel in the dataset's label space (with
a background class it is class 0, as in mmseg's PASCAL VOC config), 255 = ignore, which is mmseg's default
``ignore_index``. So ``reduce_zero_label`` is False: index 0 is a class (background, or the first class of a
dataset without one), never "unlabelled". They are 8-bit gray PNGs, not the palette PNGs of ``pseudo_masks/``:
mmseg's ``LoadAnnotations`` decodes with either of mmcv's backends (``imdecode_backend``: pillow, its default, or
cv2), and OpenCV turns a palette PNG into its colours where a gray one stays the indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.formats._registry import ExportSource, place_image, register_format
from pipeline.runfolder import voc_palette, write_text

SNIPPET = "dataset.py"


def dataset_snippet(root: Path, source: ExportSource) -> str:
    """A dataset config in the shape of mmseg's ``configs/_base_/datasets/*.py``: ``metainfo`` (classes, palette),
    a training pipeline and ``train_dataloader``; a model config lists it in ``_base_``."""
    palette = voc_palette()
    colours = [palette[3 * k: 3 * k + 3] for k in range(len(source.label_names))]
    classes = ", ".join(repr(n) for n in source.label_names)
    return (
        "# mmsegmentation 1.x: the pseudo-masks as a training set; list this file in a model config's _base_\n"
        "# (there is no held-out set: add a val_dataloader on real masks for a real score)\n"
        f"data_root = {str(root.resolve())!r}\n"
        f"metainfo = dict(classes=({classes},), palette={colours})\n"
        "crop_size = (512, 512)\n"
        "train_pipeline = [\n"
        "    dict(type='LoadImageFromFile'),\n"
        "    dict(type='LoadAnnotations'),\n"
        "    dict(type='RandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),\n"
        "    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),\n"
        "    dict(type='RandomFlip', prob=0.5),\n"
        "    dict(type='PhotoMetricDistortion'),\n"
        "    dict(type='PackSegInputs'),\n"
        "]\n"
        "train_dataset = dict(\n"
        "    type='BaseSegDataset', data_root=data_root, metainfo=metainfo,\n"
        "    data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),\n"
        "    img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=False, ignore_index=255,\n"
        "    pipeline=train_pipeline)\n"
        "train_dataloader = dict(\n"
        "    batch_size=4, num_workers=4, persistent_workers=True,\n"
        "    sampler=dict(type='InfiniteSampler', shuffle=True), dataset=train_dataset)\n"
    )


@register_format("mmseg")
def write_mmseg(source: ExportSource, out_dir: Path, final_dir: Path) -> dict[str, Any]:
    (out_dir / "ann_dir" / "train").mkdir(parents=True, exist_ok=True)
    for item, label in source.labels("mmseg"):
        place_image(item.image, out_dir / "img_dir" / "train" / f"{item.id}.jpg", source.images)
        Image.fromarray(label).save(out_dir / "ann_dir" / "train" / f"{item.id}.png", format="PNG")
    write_text(out_dir / SNIPPET, dataset_snippet(final_dir, source))
    return {"images": len(source.items)}
