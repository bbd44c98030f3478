"""Class model visualisation (Simonyan et al. 2014): the ascent raises each class score, the L2 term bounds
the image, the result is deterministic, and make_maps writes it once (a run-once visualisation, not a map method)
while evaluate does not score it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import on_tiny
from PIL import Image
from torch import nn

from pipeline.errors import ConfigError
from pipeline.maps import MAP_METHODS, get_map_method
from pipeline.maps.class_model import class_model_images, to_uint8, write_class_models
from pipeline.maps.visualize import VISUALIZATIONS, get_visualization
from stages.cli import main

SIZE = 32
PAPER = {"jitter": 0, "blur_every": 0}  # the paper's plain objective
REGULARISED = {"jitter": 2, "blur_every": 4, "blur_sigma": 0.5}


def _toy_batch(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one 12x12 patch at a random place: classes 0-2 raise colour channel 0-2 there,
    class 3 paints grey horizontal stripes."""
    x = 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    corners = torch.randint(0, SIZE - 12, (n, 2), generator=gen).tolist()
    stripes = torch.tensor([1.0, -1.0]).repeat(6).view(12, 1)
    for i, (c, (top, left)) in enumerate(zip(y.tolist(), corners, strict=True)):
        patch = x[i, :, top:top + 12, left:left + 12]
        if c < 3:
            patch[c] += 1.5
        else:
            patch += stripes
    return x, y


@pytest.fixture(scope="module")
def net():
    """A small CNN trained for a second on the toy task (test accuracy checked)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        x, y = _toy_batch(gen, 32)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    x, y = _toy_batch(gen, 200)
    assert (model(x).argmax(1) == y).float().mean() > 0.9
    return model


@pytest.mark.parametrize("options", [PAPER, REGULARISED], ids=["paper", "jitter+blur"])
def test_ascent_raises_each_class_score_to_the_top(net, options):
    out = class_model_images(net, 4, steps=40, lr=0.05, l2=1e-3, size=SIZE, **options)
    assert out.images.shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(out.initial, net(torch.zeros(1, 3, SIZE, SIZE))[0])  # the mean image: I = 0
    scores = net(out.images)
    torch.testing.assert_close(out.final, scores.diagonal())
    assert (out.final - out.initial).min() > 20.0  # every class gains more than 20 logits over the mean image ...
    assert scores.argmax(1).equal(torch.arange(4))  # ... and its image ranks it top-1 among the classes
    channel_means = out.images[:3].mean((2, 3))  # the colour classes' images are of their colour
    assert channel_means.argmax(1).equal(torch.arange(3))


def test_larger_l2_gives_smaller_images(net):
    norms = [class_model_images(net, 4, steps=40, l2=l2, size=SIZE, **PAPER).images.flatten(1).norm(dim=1)
             for l2 in (1e-4, 1e-2, 1e-1)]
    assert (norms[0] > norms[1]).all() and (norms[1] > norms[2]).all()


def test_deterministic_and_seeded(net):
    a, b, c = (class_model_images(net, 4, steps=12, size=SIZE, seed=s, **REGULARISED).images for s in (0, 0, 1))
    assert a.equal(b) and not a.equal(c)


def test_to_uint8_stretches_each_image():
    images = torch.stack([torch.randn(3, 8, 8), 0.01 * torch.randn(3, 8, 8), torch.zeros(3, 8, 8)])
    out = to_uint8(images, mean=[0.5] * 3, std=[0.25] * 3, percentile=0.0)
    assert out.shape == (3, 8, 8, 3) and out.dtype == np.uint8
    assert [(int(o.min()), int(o.max())) for o in out[:2]] == [(0, 255), (0, 255)]  # faint or not, full range
    assert (out[2] == 0).all()  # a flat image stays flat (no division by zero)


def test_registered_as_a_visualisation_not_a_map_method():
    assert get_visualization("class_model") is write_class_models and "class_model" in VISUALIZATIONS
    assert "class_model" not in MAP_METHODS and "cam" not in VISUALIZATIONS
    with pytest.raises(ConfigError, match=r"^config key 'maps.methods': 'class_model' is a run-once visualisation, "
                                          r"not a map method; move it to maps.visualizations$"):
        get_map_method("class_model")
    with pytest.raises(ConfigError, match=r"^config key 'maps.visualizations': unknown visualisation 'cam'; "
                                          r"expected one of class_model$"):
        get_visualization("cam")


def test_class_model_under_maps_methods_is_a_one_line_error(tiny_voc, tmp_path, capsys):
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"kind": "voc", "root": str(tiny_voc(background=True))},
           "maps": {"methods": ["cam", "class_model"]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    assert main(["make_maps", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: config key 'maps.methods': 'class_model' is a run-once visualisation, not a map method; "
                   "move it to maps.visualizations")


def test_make_maps_writes_grid_once_and_evaluate_skips_it(tiny_voc, tmp_path, caplog):
    cfg = {"run_dir": str(tmp_path / "run"), "device": "cpu",
           "data": {"kind": "voc", "root": str(tiny_voc(background=True))},
           "classifier": {"backbone": "smallcnn", "input_size": SIZE, "epochs": 2, "batch_size": 2},
           "maps": {"methods": ["cam"], "visualizations": ["class_model"], "class_model": {"steps": 10, "size": 24}},
           "refine": {"refiners": ["threshold"], "workers": "1"}, "segmenter": {"enabled": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(on_tiny(cfg)))
    assert main(["all", "--config", str(path)]) == 0
    maps = tmp_path / "run" / "maps"
    scores = json.loads((maps / "class_model.json").read_text())
    assert list(scores) == ["cat", "dog", "sofa"]
    assert all(s["final"] >= s["initial"] for s in scores.values())  # (barely trained: the rise is tested above)
    grid = np.asarray(Image.open(maps / "class_model.png").convert("RGB"))
    assert grid.shape[1] > 3 * 24 and len(np.unique(grid.reshape(-1, 3), axis=0)) > 500  # tiles of many colours
    assert not (maps / "class_model").exists() and len(list((maps / "cam").iterdir())) == 3
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["maps"]) == ["cam"]

    before = (maps / "class_model.png").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["make_maps", "--config", str(path)]) == 0
    assert any("make_maps: up to date, skipped" in r.getMessage() for r in caplog.records)
    assert (maps / "class_model.png").stat().st_mtime_ns == before
