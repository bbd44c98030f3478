"""Salient-object maps: seconds per image of U²-Net-p, the pipeline's torch port (batched, as the saliency stage runs
it) against onnxruntime on the packaged file itself (one image per call, as rembg runs it), on MSRC-21 photos; and
the largest difference between the two maps. Writes bench/saliency.json.

    .venv/bin/python -m bench.bench_saliency [--images 32] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from pipeline.config import DataConfig
from pipeline.data import load_dataset, read_image
from pipeline.device import resolve_device
from pipeline.saliency import PACKAGED, load_model, packaged_weights, predict, preprocess

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
log = logging.getLogger("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/saliency.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    ds = load_dataset(DataConfig(kind="voc", root=str(MSRC), background=False), "train")
    images = [read_image(s.image_path) for s in ds.samples[: args.images]]
    device = resolve_device("auto")
    net = load_model(PACKAGED, device)
    predict(net, images[:1], device)  # warm-up
    t0 = time.perf_counter()
    ours = []
    for i in range(0, len(images), args.batch):
        ours += predict(net, images[i:i + args.batch], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    torch_s = (time.perf_counter() - t0) / len(images)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(packaged_weights()), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: preprocess(images[0])[None].numpy()})  # warm-up
    t0 = time.perf_counter()
    raw = [session.run(None, {name: preprocess(im)[None].numpy()})[0][0, 0] for im in images]
    ort_s = (time.perf_counter() - t0) / len(images)

    with torch.no_grad():  # the same 320x320 output of both, before the resize back to the image
        port = [torch.sigmoid(net(preprocess(im)[None].to(device)).float())[0, 0].cpu().numpy() for im in images[:4]]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(port, raw[:4], strict=True))
    result = {"images": len(images), "batch": args.batch, "threads": args.threads, "device": str(device),
              "torch_s_per_image": round(torch_s, 4), "onnxruntime_cpu_s_per_image": round(ort_s, 4),
              "max_abs_diff": diff}
    log.info("U²-Net-p on %d MSRC-21 photos: torch (%s, batch %d) %.3f s/image, onnxruntime (CPU) %.3f s/image, "
             "max |difference| %.2g", len(images), device, args.batch, torch_s, ort_s, diff)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
