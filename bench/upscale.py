"""What an upscale costs: seconds per megapixel out, and peak memory against the tile size.

1. Time: a 4x ESRGAN of the tiny size (tiny-upscaler) and of Real-ESRGAN x4plus's size (64
   features, 23 blocks: random weights, the same work), each run as the service runs it
   (`Upscaling.prepare` in the caller, `Upscaling.run` on a device thread with the service's
   torch threads, the model loaded and one upscale run before any figure), against a Lanczos
   resize of the same sizes through the same path: the baseline of the same run.
2. Memory: the real-size model on one picture at each tile size, each in a fresh process
   (the peak of its resident memory, sampled every millisecond, over what it held once the
   model was loaded; on CUDA, torch's peak allocation), against the whole picture in one piece.

    python bench/upscale.py [--runs 5] [--tiny-side 256] [--real-side 64] [--memory-side 128]

A private BentoML home with the two upscalers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-upscale-"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.device_thread import DeviceThread
from backends.sdxl_backend.generation.images import encode_image
from backends.sdxl_backend.generation.upscaling import Upscaling
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.upscalers import Tiling, UpscalerSource, load_upscaler, save_upscaler, upscale
from backends.sdxl_backend.upscale_protocol import UpscaleRequest

REAL_SIZE = {"num_filters": 64, "num_blocks": 23}  # Real-ESRGAN x4plus's RRDBNet


def real_size_upscaler(folder: Path) -> Path:
    """Real-ESRGAN x4plus's architecture with random weights, in the store's layout."""
    from spandrel import ModelLoader
    from spandrel.architectures.ESRGAN import ESRGAN

    if not (folder / "upscaler.json").is_file():
        torch.manual_seed(0)
        network = ESRGAN(in_nc=3, out_nc=3, scale=4, **REAL_SIZE)
        save_upscaler(ModelLoader().load_from_state_dict(network.state_dict()), folder)
    return folder


def noise_png(side: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(pixels), "png", 90, "")


def timings(args: argparse.Namespace, folders: dict[str, Path]) -> None:
    placement = select_placement()
    sources = [UpscalerSource(name, folder) for name, folder in folders.items()]
    models = ModelManager([], placement, upscalers=sources, max_loaded_upscalers=len(sources))
    upscaling = Upscaling(models, Limits(), Tiling())
    thread, woken, done = DeviceThread(), threading.Event(), threading.Event()  # the service's: its torch threads

    def loop() -> None:  # (as the device worker's: run what is handed over, as soon as it is)
        while not done.is_set():
            woken.wait()
            woken.clear()
            thread.run_calls()

    thread.start(loop, woken.set)

    def seconds(upscaler: str, side: int) -> float:
        prepared = upscaling.prepare(UpscaleRequest(image=noise_png(side), upscaler=upscaler, scale=4))
        started = time.perf_counter()
        thread.run(lambda: upscaling.run(prepared))
        return time.perf_counter() - started

    print(f"{placement.describe()}, {thread.torch_threads} torch thread(s); p50 of {args.runs}, 4x, default tiles:")
    print("| upscaler | input | s per megapixel out | vs Lanczos |\n| --- | --- | --- | --- |")
    for upscaler, side in (("tiny-upscaler", args.tiny_side), ("real-size-esrgan", args.real_side)):
        seconds(upscaler, side), seconds("lanczos", side)  # (the load and the first run: no figure)
        megapixels = (4 * side) ** 2 / 1e6
        model = statistics.median(seconds(upscaler, side) for _ in range(args.runs)) / megapixels
        lanczos = statistics.median(seconds("lanczos", side) for _ in range(args.runs)) / megapixels
        print(f"| {upscaler} | {side} px | {model:.2f} | {model / lanczos:.0f}x |")
    done.set()
    woken.set()


def peak_memory(folder: Path, side: int, tile: int) -> int:
    """In this (fresh) process: the peak bytes one upscale holds beyond the loaded model (on
    the CPU, the resident memory sampled every millisecond while it runs)."""
    import psutil
    from PIL import Image

    placement = select_placement()
    model = load_upscaler(folder, placement)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
    tiling = Tiling(tile, min(32, tile // 4))
    if placement.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        upscale(model, picture, (4 * side, 4 * side), tiling)
        return torch.cuda.max_memory_allocated() - base
    process, peak, running = psutil.Process(), [0], threading.Event()
    base = process.memory_info().rss

    def sample() -> None:
        while not running.wait(0.001):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    upscale(model, picture, (4 * side, 4 * side), tiling)
    running.set()
    sampler.join()
    return max(peak[0], process.memory_info().rss) - base


def memory(args: argparse.Namespace, folder: Path) -> None:
    print(f"\nreal-size 4x ESRGAN, {args.memory_side} px in, one run per fresh process:")
    print("| tile (overlap) | peak MiB beyond the model | vs whole |\n| --- | --- | --- |")
    whole = None
    for tile in [0, *(tile for tile in (512, 256, 128, 64, 32) if tile < args.memory_side)]:
        out = subprocess.run(
            [sys.executable, __file__, "--peak", str(tile), "--memory-side", str(args.memory_side), str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        whole = whole or peak
        label = "whole picture" if tile == 0 else f"{tile} ({min(32, tile // 4)})"
        print(f"| {label} | {peak / 2**20:.0f} | {peak / whole:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tiny-side", type=int, default=256)
    parser.add_argument("--real-side", type=int, default=64)
    parser.add_argument("--memory-side", type=int, default=128)
    parser.add_argument("--peak", type=int, help=argparse.SUPPRESS)  # (the child: one tile size)
    parser.add_argument("folder", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak is not None:
        print(json.dumps({"peak": peak_memory(Path(args.folder), args.memory_side, args.peak)}))
        return

    from models.store import import_tiny

    folders = {
        "tiny-upscaler": Path(import_tiny("tiny-upscaler").path),
        "real-size-esrgan": real_size_upscaler(Path(os.environ["BENTOML_HOME"]) / "real-size-esrgan"),
    }
    timings(args, folders)
    memory(args, folders["real-size-esrgan"])


if __name__ == "__main__":
    main()
