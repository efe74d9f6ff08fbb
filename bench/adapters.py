"""What LoRAs and ControlNets cost per request, on tiny-sdxl through the engine (no HTTP): a
request without either; the first request that names a LoRA (it loads), the same LoRA again,
alternating between two loaded LoRAs (a switch); the first request with a ControlNet (it
loads), the same again, with canny preprocessing, two at once. Each against the plain request
of the same run.

    python bench/adapters.py [--runs 20] [--size 64] [--steps 4]

A private BentoML home with tiny-sdxl, two tiny LoRAs and tiny-sdxl-controlnet.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="sdxl-adapters-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.controlnets import ControlNetSource
from backends.sdxl_backend.models.loras import LoraSource
from backends.sdxl_backend.models.manager import ModelManager, ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.units import LoraWeight
from models.catalog import defaults_for
from models.store import import_from_path, import_tiny
from models.tiny import save_tiny_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    model = import_tiny()
    folder = Path(tempfile.mkdtemp(prefix="lora-b-"))
    save_tiny_lora(folder, seed=99)
    loras = [
        import_tiny("tiny-sdxl-lora"),
        import_from_path("tiny-lora-b", folder / "pytorch_lora_weights.safetensors", fits="tiny-sdxl"),
    ]
    sources = [LoraSource(m.info.labels["sdxl_id"], Path(m.path), m.info.labels["fits"]) for m in loras]
    controlnet = import_tiny("tiny-sdxl-controlnet")
    controlnets = [ControlNetSource("tiny-sdxl-controlnet", Path(controlnet.path), controlnet.info.labels["fits"])]
    square = Image.new("RGB", (args.size, args.size))
    square.paste((255, 255, 255), (args.size // 4, args.size // 4, 3 * args.size // 4, 3 * args.size // 4))
    buffer = io.BytesIO()
    square.save(buffer, format="PNG")
    control = {"id": "tiny-sdxl-controlnet", "image": buffer.getvalue()}

    def engine() -> Engine:
        source = ModelSource("tiny-sdxl", Path(model.path), defaults_for("tiny-sdxl"))
        built = Engine(ModelManager([source], select_placement(), loras=sources, controlnets=controlnets), "tiny-sdxl")
        for _ in range(3):  # the model loads here, and the thread pools warm up, not in a figure
            run(built)
        return built

    def run(on: Engine, *named: str, units: tuple[dict, ...] = ()) -> float:
        request = GenerationRequest(
            prompt="a lighthouse",
            seed=1,
            width=args.size,
            height=args.size,
            steps=args.steps,
            loras=[LoraWeight(id=i) for i in named],
            controlnets=units,
        )
        started = time.perf_counter()
        on.generate(on.prepare(request))
        return time.perf_counter() - started

    warm = engine()
    plain = [run(warm) for _ in range(args.runs)]
    first = [run(engine(), "tiny-sdxl-lora") for _ in range(max(3, args.runs // 4))]
    run(warm, "tiny-sdxl-lora"), run(warm, "tiny-lora-b")
    again = [run(warm, "tiny-sdxl-lora") for _ in range(args.runs)]
    switching = [run(warm, ("tiny-sdxl-lora", "tiny-lora-b")[i % 2]) for i in range(args.runs)]
    back_to_none = [run(warm) for _ in range(args.runs)]
    fresh = engine()  # (no LoRA ever loaded: PEFT's wrapped layers would slow every ControlNet figure)
    plain_fresh = [run(fresh) for _ in range(args.runs)]
    controlnet_first = [run(engine(), units=(control,)) for _ in range(max(3, args.runs // 4))]
    run(fresh, units=(control,))
    controlnet_again = [run(fresh, units=(control,)) for _ in range(args.runs)]
    canny = [run(fresh, units=({**control, "preprocess": "canny"},)) for _ in range(args.runs)]
    two = [run(fresh, units=(control, control)) for _ in range(args.runs)]

    print(f"tiny-sdxl {args.size}x{args.size}, {args.steps} steps, guidance, CPU; p50 of {args.runs}:")
    print("| request | p50 ms | vs plain |\n| --- | --- | --- |")
    for baseline, rows in [
        (
            plain,
            [
                ("no LoRA", plain),
                ("first use of a LoRA (loads it)", first),
                ("the same LoRA again", again),
                ("alternating two loaded LoRAs", switching),
                ("no LoRA, with two loaded", back_to_none),
            ],
        ),
        (
            plain_fresh,
            [
                ("no ControlNet (no LoRA ever loaded)", plain_fresh),
                ("first use of a ControlNet (loads it)", controlnet_first),
                ("one loaded ControlNet", controlnet_again),
                ("one ControlNet, canny preprocessing", canny),
                ("two ControlNets", two),
            ],
        ),
    ]:
        base = statistics.median(baseline)
        for name, seconds in rows:
            p50 = statistics.median(seconds)
            print(f"| {name} | {p50 * 1000:.1f} | {p50 / base:.2f}x |")


if __name__ == "__main__":
    main()
