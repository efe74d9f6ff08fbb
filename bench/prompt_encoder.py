"""What the prompt encoder costs: prompts of 1, 3 and 10 chunks of 75 tokens, on the device
thread's arrangement (one thread, its thread count), against the whole request.

- tiny-sdxl: the encoding (text encoders and emphasis, cache bypassed), a whole request with a
  prompt of that length read for the first time (64x64, 4 steps), and the same request again
  (its encoding then comes from the model's cache);
- SDXL's real text encoders (CLIP-L and OpenCLIP-G at full size, random weights, float32 on
  the CPU, as the service runs them there): the encoding alone.

    python bench/prompt_encoder.py [--runs 10]

It uses a private BentoML home with tiny-sdxl imported.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="sdxl-bench-"))
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from gpu_sdxl import CLIP_G, CLIP_L  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from backends.sdxl_backend.device import select_placement  # noqa: E402
from backends.sdxl_backend.device_thread import usable_cores  # noqa: E402
from backends.sdxl_backend.generation.engine import Engine  # noqa: E402
from backends.sdxl_backend.models.manager import ModelManager, ModelSource  # noqa: E402
from backends.sdxl_backend.prompts.encoder import encode  # noqa: E402
from backends.sdxl_backend.protocol import GenerationRequest  # noqa: E402
from models.catalog import defaults_for  # noqa: E402
from models.store import import_tiny, stored_model  # noqa: E402

CHUNKS = (1, 3, 10)


def prompt_of(chunks: int, salt: int = 0) -> str:
    """A prompt of exactly `chunks` chunks for tiny-sdxl's byte-level tokenizer (a token a
    character), different for each `salt` so that no cache holds it."""
    words = f"w{salt}q " * 1000
    return words.replace(" ", "")[: 75 * chunks]


def p50_ms(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(runs: int) -> list[str]:
    model = stored_model("tiny-sdxl") or import_tiny()
    engine = Engine(
        ModelManager([ModelSource("tiny-sdxl", Path(model.path), defaults_for("tiny-sdxl"))], select_placement()),
        "tiny-sdxl",
    )
    request = {"width": 64, "height": 64, "steps": 4, "seed": 1}
    engine.generate(engine.prepare(GenerationRequest(prompt="warm-up", **request)))
    rows = [
        "| chunks | tiny: encoding | tiny: whole request, new prompt | tiny: the same again (cached) | "
        "real text encoders: encoding |",
        "| --- | --- | --- | --- | --- |",
    ]
    real = SimpleNamespace(
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).eval(),
        _execution_device=torch.device("cpu"),
    )
    salt = iter(range(10**6))
    for chunks in CHUNKS:
        read = engine.prepare(GenerationRequest(prompt=prompt_of(chunks), **request)).prompts.prompt
        assert read.chunk_count == chunks
        with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
            encoding = p50_ms(functools.partial(encode, pipelines.txt2img, [read]), runs)

        def generate(prompt: str) -> None:
            engine.generate(engine.prepare(GenerationRequest(prompt=prompt, **request)))

        new = p50_ms(lambda: generate(prompt_of(chunks, next(salt))), runs)  # noqa: B023 (called in this iteration)
        again = p50_ms(functools.partial(generate, prompt_of(chunks)), runs)
        real_encoding = p50_ms(functools.partial(encode, real, [read]), max(3, runs // 3))
        rows.append(f"| {chunks} | {encoding:.1f} ms | {new:.1f} ms | {again:.1f} ms | {real_encoding:.0f} ms |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    rows: list[str] = []

    def on_device_thread() -> None:  # (as the service runs it: one thread, its thread count)
        torch.set_num_threads(usable_cores())
        rows.extend(measure(args.runs))

    thread = threading.Thread(target=on_device_thread, name="sdxl-device")
    thread.start()
    thread.join()
    print(f"\nPrompt encoder on {usable_cores()} CPU cores (p50 of {args.runs}):")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
