"""Label statistics of the training split: how often each class appears, and how often two appear together.

An image-level label says *that* a class is in the image, not *where*. A classifier learns where a class is
only by contrast: from images that hold it against images that do not. So the statistics of the labels alone
tell, before any training, which classes the labels cannot localise:

- ``frequency[a]``: the share of the training images that hold class a;
- ``conditional[a][b]`` = P(b | a): the share of a's images that also hold b (1 on the diagonal).

From them come the warnings a run logs at the start of ``train_classifier`` (``label_warnings``) and the
classes that the context-decoupled round targets (``context_of``: class a's context is every class b with
P(b | a) at or above a share; pipeline/decouple.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

UBIQUITOUS = 0.9  # a class in at least this share of the training images cannot be told from the rest of them
INSEPARABLE = 0.9  # two classes each in at least this share of the other's images cannot be told apart
BOUND = 0.9  # a class whose images hold another one at least this often is hardly seen without it
# fewer training images than this: too few to learn a class from, and too few to say that it is bound to another
# (one image of a dog on a sofa is no evidence that dogs come with sofas)
FEW_IMAGES = 10


@dataclass
class LabelStats:
    classes: list[str]
    images: int  # training images with at least one label
    counts: np.ndarray  # [C] images holding each class
    together: np.ndarray  # [C, C] images holding both classes (the diagonal is ``counts``)

    @property
    def frequency(self) -> np.ndarray:
        return self.counts / max(self.images, 1)

    @property
    def conditional(self) -> np.ndarray:
        """P(b | a) = together[a, b] / counts[a], row a; NaN for a class without images."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.together / self.counts[:, None].astype(np.float64)

    def to_json(self) -> dict[str, Any]:
        cond = self.conditional

        def share(v: float) -> float | None:
            return None if np.isnan(v) else round(float(v), 4)

        return {
            "images": self.images,
            "classes": {c: {"images": int(self.counts[i]), "frequency": round(float(self.frequency[i]), 4)}
                        for i, c in enumerate(self.classes)},
            # conditional[a][b] = P(b | a): the share of a's images that also hold b
            "conditional": {a: {b: share(cond[i, j]) for j, b in enumerate(self.classes)}
                            for i, a in enumerate(self.classes)},
            "together": self.together.astype(int).tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelStats:
        classes = list(data["classes"])
        counts = np.array([data["classes"][c]["images"] for c in classes], dtype=np.int64)
        return cls(classes, int(data["images"]), counts, np.array(data["together"], dtype=np.int64))


def label_stats(classes: list[str], labels: list[tuple[int, ...]]) -> LabelStats:
    """The statistics of ``labels`` (one tuple of class indices per image) over ``classes``."""
    onehot = np.zeros((len(labels), len(classes)), dtype=np.int64)
    for i, image_labels in enumerate(labels):
        onehot[i, list(image_labels)] = 1
    together = onehot.T @ onehot
    return LabelStats(list(classes), len(labels), np.diag(together).copy(), together)


@dataclass(frozen=True)
class LabelWarning:
    kind: str  # absent | few | ubiquitous | inseparable | bound
    classes: tuple[str, ...]
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": list(self.classes), "message": self.message}


def label_warnings(stats: LabelStats) -> list[LabelWarning]:
    """What the labels cannot teach, each with what a user can do about it. Never raises: a class without
    images, a single class, or every image holding every class give warnings like any other table."""
    out: list[LabelWarning] = []
    names, n, cond = stats.classes, stats.images, stats.conditional
    for i, c in enumerate(names):
        k = int(stats.counts[i])
        if k == 0:
            out.append(LabelWarning("absent", (c,), f"class '{c}' is in none of the {n} training images: it cannot "
                                    "be learnt; add labelled photos of it or remove it from the classes"))
        elif k < FEW_IMAGES:
            out.append(LabelWarning("few", (c,), f"class '{c}' is in only {k} training image(s) (fewer than "
                                    f"{FEW_IMAGES}): its maps will be unreliable; add labelled photos of it"))
        if k and stats.frequency[i] >= UBIQUITOUS:
            out.append(LabelWarning("ubiquitous", (c,), f"class '{c}' is in {stats.frequency[i]:.0%} of the {n} "
                                    "training images: image-level labels cannot localise it against the rest of "
                                    "the image; add photos without it, or accept masks that spread over the image"))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j == i or min(stats.counts[i], stats.counts[j]) < FEW_IMAGES:
                continue
            ab, ba = cond[i, j], cond[j, i]  # P(b | a), P(a | b)
            if ab >= INSEPARABLE and ba >= INSEPARABLE:
                if i < j:
                    out.append(LabelWarning("inseparable", (a, b), f"classes '{a}' and '{b}' appear together "
                                            f"({b} in {ab:.0%} of {a}'s images, {a} in {ba:.0%} of {b}'s): labels "
                                            "cannot tell them apart; add photos that show one without the other, "
                                            "or accept that their masks mix"))
            elif ab >= BOUND:
                out.append(LabelWarning("bound", (a, b), f"class '{a}' is hardly ever seen without '{b}' ({b} in "
                                        f"{ab:.0%} of {a}'s images): its maps may spread over {b}; add photos of "
                                        f"{a} without {b} (the decoupled round pastes {a} onto other images)"))
    return out


def context_of(stats: LabelStats, share: float) -> dict[str, list[str]]:
    """Each class with a context: ``{a: [b, ...]}`` for the classes b with P(b | a) >= ``share``, b != a, for the
    classes with at least ``FEW_IMAGES`` training images. The targets of the context-decoupled round
    (pipeline/decouple.py)."""
    cond = stats.conditional
    out = {}
    for i, a in enumerate(stats.classes):
        if stats.counts[i] < FEW_IMAGES:
            continue
        ctx = [b for j, b in enumerate(stats.classes) if j != i and cond[i, j] >= share]
        if ctx:
            out[a] = ctx
    return out
