"""The refiner: the base model denoises the first part, the refiner (an image-to-image-only
model) the rest, without decoding in between. tiny-sdxl-refiner is shaped as SDXL's refiner."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from models.catalog import defaults_for
from tests.conftest import pixels, png_bytes


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_refiner):
    sources = [
        ModelSource(m.info.labels["sdxl_id"], Path(m.path), defaults_for(m.info.labels["sdxl_id"]))
        for m in (tiny_model, tiny_refiner)
    ]
    return Engine(ModelManager(sources, select_placement()), "tiny-sdxl")


REFINED = {
    "prompt": "a lighthouse",
    "seed": 3,
    "steps": 8,
    "refiner": {"model": "tiny-sdxl-refiner", "switch_at": 0.75},
}


def test_the_refiner_takes_the_last_steps_of_text_to_image(engine):
    steps: list[tuple[int, int]] = []
    refined = engine.generate(
        engine.prepare(GenerationRequest(**REFINED)), lambda step, total, _: steps.append((step, total))
    )
    alone = engine.generate(engine.prepare(GenerationRequest(**{**REFINED, "refiner": None})))
    assert pixels(refined.images[0].data) != pixels(alone.images[0].data)
    assert engine.models.loads == {"tiny-sdxl": 1, "tiny-sdxl-refiner": 1}
    assert [step for step, _ in steps] == list(range(1, 9))  # 6 steps of the base, 2 of the refiner, one count
    assert {total for _, total in steps} == {8}
    again = engine.generate(engine.prepare(GenerationRequest(**REFINED)))
    assert pixels(again.images[0].data) == pixels(refined.images[0].data)
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.75" in refined.images[0].data.decode("latin-1")


def test_the_refiner_also_finishes_image_to_image(engine):
    body = {**REFINED, "image": png_bytes(64, 64), "strength": 0.5}
    refined = engine.generate(engine.prepare(GenerationRequest(**body)))
    alone = engine.generate(engine.prepare(GenerationRequest(**{**body, "refiner": None})))
    assert pixels(refined.images[0].data) != pixels(alone.images[0].data)


def test_a_refiner_request_is_checked_before_the_queue(engine):
    for fields, message in [
        ({"refiner": {"model": "tiny-sdxl"}}, "refiner.model: 'tiny-sdxl' is not a refiner"),
        ({"refiner": {"model": "tiny-sdxl-refiner"}, "hires_fix": {"scale": 2}}, "refiner: not with hires_fix"),
        (
            {"model": "tiny-sdxl-refiner", "image": png_bytes(64, 64), "refiner": {"model": "tiny-sdxl-refiner"}},
            "refiner: model 'tiny-sdxl-refiner' is a refiner itself",
        ),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            engine.prepare(GenerationRequest(prompt="x", **fields))
    assert engine.batch_key(engine.prepare(GenerationRequest(**REFINED))) is None  # runs alone


@pytest.mark.served
def test_native_and_a1111_clients_hand_off_to_the_refiner(side_models_server):
    server = side_models_server
    native = httpx.post(f"{server.url}/v1/txt2img", json={**REFINED, "width": 64, "height": 64}, timeout=300)
    assert native.status_code == 200, native.text
    a1111 = httpx.post(
        f"{server.url}/sdapi/v1/txt2img",
        timeout=300,
        json={
            "prompt": "a lighthouse",
            "seed": 3,
            "steps": 8,
            "width": 64,
            "height": 64,
            "refiner_checkpoint": "tiny-sdxl-refiner",
            "refiner_switch_at": 0.75,
        },
    )
    assert a1111.status_code == 200, a1111.text
    assert pixels(base64.b64decode(a1111.json()["images"][0])) == pixels(
        base64.b64decode(native.json()["images"][0]["b64_json"])
    )
    refused = httpx.post(
        f"{server.url}/v1/txt2img",
        timeout=300,
        json={"prompt": "x", "refiner": {"model": "tiny-sdxl", "switch_at": 0.8}},
    )
    assert refused.status_code == 400 and "is not a refiner" in refused.json()["error"]["message"]
