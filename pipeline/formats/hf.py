"""Hugging Face ``datasets`` export: ``exports/hf/``, a ``DatasetDict`` with one split, ``train``, saved by
``save_to_disk`` and read back offline by ``datasets.load_from_disk``, plus ``id2label.json``.

Columns: ``id`` (string), ``image`` and ``label`` (``datasets.Image``, the JPEG and the label PNG embedded as
bytes, so the folder holds everything). A label pixel is a label index (``id2label``: index -> name; with a
background class, 0 is background) or 255 = ignore, the default ``ignore_index`` of transformers' segmentation
models. ``id2label`` is also in the dataset's ``info.description`` (JSON) so it travels with the dataset.
``datasets`` is imported only here: it is an optional dependency (``pip install datasets``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.formats._registry import ExportSource, register_format
from pipeline.runfolder import write_json

ID2LABEL = "id2label.json"


@register_format("hf")
def write_hf(source: ExportSource, out_dir: Path, final_dir: Path) -> dict[str, Any]:
    try:
        import datasets
    except ImportError:
        raise UserError("config key 'export.formats': hf needs the datasets package (pip install datasets)") from None

    id2label = {str(k): name for k, name in enumerate(source.label_names)}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "label": datasets.Image()})

    def rows():
        for item in source.each("hf"):
            yield {"id": item.id, "image": {"bytes": item.image.read_bytes(), "path": f"{item.id}.jpg"},
                   "label": {"bytes": item.label.read_bytes(), "path": f"{item.id}.png"}}

    cache = out_dir.parent / f".{out_dir.name}.cache"  # the generator's arrow cache, not ~/.cache
    try:
        info = datasets.DatasetInfo(description=json.dumps({"id2label": id2label}))
        train = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(cache), info=info)
        datasets.DatasetDict({"train": train}).save_to_disk(str(out_dir))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    write_json(out_dir / ID2LABEL, id2label)
    return {"images": len(source.items)}
