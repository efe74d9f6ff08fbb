"""LoRAs: from the store, per request, in every dialect; switching never reloads the model, no
request's LoRAs leak into the next, and weight 0 gives the model's own picture exactly.
tiny-sdxl-lora and a second LoRA built the same way (another seed) stand in for real ones."""

from __future__ import annotations

import base64
from pathlib import Path

import anyio
import httpx
import pytest

from backends.api.a1111.mapping import take_loras
from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.loras import LoraSource
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.units import LoraWeight
from models.catalog import defaults_for
from tests.conftest import FITS_TINY_SDXL, nothing_loaded, pixels
from tests.test_mcp import connected


@pytest.fixture(scope="module")
def loras(tiny_lora, tmp_path_factory) -> list[LoraSource]:
    """tiny-sdxl-lora; a second LoRA for tiny-sdxl, imported from a file with `--fits`; and the
    same file imported without it, so that it claims SDXL base's architecture."""
    from models.store import import_from_path, stored_model
    from models.tiny import save_tiny_lora

    folder = tmp_path_factory.mktemp("lora-b")
    save_tiny_lora(folder, seed=99)
    file = folder / "pytorch_lora_weights.safetensors"
    other = stored_model("tiny-lora-b") or import_from_path("tiny-lora-b", file, fits="tiny-sdxl")
    unfit = stored_model("sdxl-style-lora") or import_from_path("sdxl-style-lora", file)
    return [
        LoraSource(m.info.labels["sdxl_id"], Path(m.path), m.info.labels["fits"]) for m in (tiny_lora, other, unfit)
    ]


def engine_with(tiny_model, loras: list[LoraSource], max_loaded_loras: int = 8) -> Engine:
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(
        ModelManager([source], select_placement(), loras=loras, max_loaded_loras=max_loaded_loras), "tiny-sdxl"
    )


def run(engine: Engine, *loras: tuple[str, float]):
    request = GenerationRequest(prompt="a lighthouse", seed=11, loras=[LoraWeight(id=i, weight=w) for i, w in loras])
    return engine.generate(engine.prepare(request))


def test_a_lora_changes_the_images_and_weight_zero_or_none_gives_the_models_own(tiny_model, loras):
    engine = engine_with(tiny_model, loras)
    base = pixels(run(engine).images[0].data)
    first = run(engine, ("tiny-sdxl-lora", 1.0))
    assert pixels(first.images[0].data) != base
    assert first.timings.lora_load_s > 0  # loaded for this request ...
    again = run(engine, ("tiny-sdxl-lora", 1.0))
    assert again.timings.lora_load_s == 0  # ... and not again
    assert pixels(again.images[0].data) == pixels(first.images[0].data)
    assert pixels(run(engine, ("tiny-sdxl-lora", 0.0)).images[0].data) == base
    assert pixels(run(engine).images[0].data) == base  # the loaded LoRA does not act on a request without it
    assert pixels(run(engine, ("tiny-sdxl-lora", 0.5)).images[0].data) not in (base, pixels(first.images[0].data))


def test_switching_loras_never_reloads_the_model_and_a_b_a_gives_a_exactly(tiny_model, loras):
    engine = engine_with(tiny_model, loras, max_loaded_loras=1)
    a = pixels(run(engine, ("tiny-sdxl-lora", 0.8)).images[0].data)
    b = pixels(run(engine, ("tiny-lora-b", 0.8)).images[0].data)
    assert engine.models.status()["loaded"][0]["loras"] == ["tiny-lora-b"]  # over the cap of 1: A went
    assert pixels(run(engine, ("tiny-sdxl-lora", 0.8)).images[0].data) == a
    both = pixels(run(engine, ("tiny-sdxl-lora", 0.8), ("tiny-lora-b", 0.8)).images[0].data)
    assert len({a, b, both}) == 3
    assert engine.models.loads == {"tiny-sdxl": 1}


def test_loras_are_checked_before_the_queue(tiny_model, loras):
    engine = engine_with(tiny_model, loras)
    for named, message in [
        ([("no-such-lora", 1.0)], "unknown LoRA 'no-such-lora'"),
        ([("sdxl-style-lora", 1.0)], "'sdxl-style-lora' does not fit model 'tiny-sdxl'"),
        ([("tiny-sdxl-lora", 1.0), ("tiny-sdxl-lora", 0.5)], "'tiny-sdxl-lora' is named twice"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            engine.prepare(GenerationRequest(prompt="x", loras=[LoraWeight(id=i, weight=w) for i, w in named]))


def test_requests_with_other_loras_do_not_share_a_call(tiny_model, loras):
    engine = engine_with(tiny_model, loras)

    def key(*named):
        return engine.batch_key(
            engine.prepare(GenerationRequest(prompt="x", loras=[LoraWeight(id=i, weight=w) for i, w in named]))
        )

    assert key(("tiny-sdxl-lora", 1.0)) == key(("tiny-sdxl-lora", 1.0))
    assert key(("tiny-sdxl-lora", 0.0)) == key()  # weight 0 is the model's own call, and shares it
    assert key(("tiny-sdxl-lora", 0.0), ("tiny-lora-b", 1.0)) == key(("tiny-lora-b", 1.0))
    assert len({key(), key(("tiny-sdxl-lora", 1.0)), key(("tiny-sdxl-lora", 0.5)), key(("tiny-lora-b", 1.0))}) == 4


def test_a1111_lora_tags_are_read_and_taken_out_of_the_prompt():
    assert take_loras("a fox <lora:tiny-sdxl-lora:0.8>, forest") == (
        "a fox, forest",
        [LoraWeight(id="tiny-sdxl-lora", weight=0.8)],
    )
    assert take_loras("<LORA: tiny-sdxl-lora >a fox") == ("a fox", [LoraWeight(id="tiny-sdxl-lora", weight=1.0)])
    assert take_loras("x <lora:a:0.5:0.3> y <lyco:b>") == (
        "x y",
        [LoraWeight(id="a", weight=0.5), LoraWeight(id="b", weight=1.0)],
    )
    assert take_loras("no tags: <b>bold</b>") == ("no tags: <b>bold</b>", [])
    with pytest.raises(InvalidRequest, match="<lora:a:strong>"):
        take_loras("a <lora:a:strong>")
    with pytest.raises(InvalidRequest, match="9 LoRA tags; at most 8"):
        take_loras("".join(f"<lora:l{i}>" for i in range(9)))


@pytest.mark.served
def test_every_dialect_takes_loras_and_lists_them(side_models_server):
    import webuiapi
    from openai import OpenAI

    server = side_models_server
    loads = nothing_loaded(server)["tiny-sdxl"]
    listed = httpx.get(f"{server.url}/v1/loras", timeout=300).json()["data"]
    assert {"id": "tiny-sdxl-lora", "fits": FITS_TINY_SDXL}.items() <= next(
        lora for lora in listed if lora["id"] == "tiny-sdxl-lora"
    ).items()
    plain = {"prompt": "a lighthouse", "seed": 5, "width": 64, "height": 64}
    with_lora = {**plain, "loras": [{"id": "tiny-sdxl-lora", "weight": 0.8}]}

    at_zero = {**plain, "loras": [{"id": "tiny-sdxl-lora", "weight": 0}]}
    answers = [
        httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=300).json() for body in (plain, with_lora, at_zero)
    ]
    native = [b64_pixels(answer["images"][0]["b64_json"]) for answer in answers]
    assert native[0] != native[1]
    assert native[2] == native[0]  # weight 0: the model's own picture ...
    assert answers[2]["parameters"]["loras"] == [{"id": "tiny-sdxl-lora", "weight": 0.0}]  # ... listed as asked
    moondream = httpx.post(f"{server.url}/v1/generate", json=with_lora, timeout=300).json()
    assert b64_pixels(moondream["images"][0]) == native[1]
    openai = OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300, max_retries=0)
    answer = openai.images.generate(
        prompt="a lighthouse", size="64x64", extra_body={"seed": 5, "loras": with_lora["loras"]}
    )
    assert b64_pixels(answer.data[0].b64_json) == native[1]

    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert "tiny-sdxl-lora" in [lora["name"] for lora in a1111.get_loras()]
    tagged = a1111.txt2img(prompt="a lighthouse <lora:tiny-sdxl-lora:0.8>", seed=5, width=64, height=64)
    assert tagged.info["prompt"] == "a lighthouse"
    untagged = a1111.txt2img(prompt="a lighthouse", seed=5, width=64, height=64)
    assert pixels_of(tagged.image) != pixels_of(untagged.image)
    at_zero_tag = a1111.txt2img(prompt="a lighthouse <lora:tiny-sdxl-lora:0>", seed=5, width=64, height=64)
    assert pixels_of(at_zero_tag.image) == pixels_of(untagged.image)
    assert a1111.png_info(at_zero_tag.image).info.startswith("a lighthouse <lora:tiny-sdxl-lora:0>\n")

    async def mcp_at_zero():
        async with connected(server) as client:
            return await client.call_tool("generate_image", at_zero)

    made = anyio.run(mcp_at_zero)
    assert not made.is_error, made.content
    assert pixels(httpx.get(made.structured_content["images"][0]["url"], timeout=30).content) == native[0]

    refused = httpx.post(f"{server.url}/v1/txt2img", json={**plain, "loras": [{"id": "nope"}]}, timeout=300)
    assert refused.status_code == 400 and "unknown LoRA 'nope'" in refused.json()["error"]["message"]
    too_many = [{"id": f"l{i}"} for i in range(9)]  # (schemathesis found this one a 500 on /v1/generate)
    for route in ("/v1/txt2img", "/v1/generate", "/v1/images/generations", "/v1/jobs"):
        answer = httpx.post(f"{server.url}{route}", json={**plain, "loras": too_many}, timeout=300)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "loras", (route, answer.text)
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    (model,) = status["loaded"]
    assert model["loras"] == ["tiny-sdxl-lora"] and status["loads"]["tiny-sdxl"] == loads + 1  # loaded once


def b64_pixels(data: str) -> bytes:
    return pixels(base64.b64decode(data.split(",")[-1]))  # (moondream's answers are data URLs)


def pixels_of(image) -> bytes:
    return image.convert("RGB").tobytes()


@pytest.mark.served
def test_a_few_step_loras_sampling_profile_fills_what_the_request_leaves_out(side_models_server):
    """tiny-sdxl-tcd-lora's catalog entry has a profile (tcd, 2 steps, guidance 0, eta 0.5):
    it fills the fields a request naming the LoRA leaves out, before the model's defaults, and
    the answer says so; what the request names stays; at weight 0 the LoRA does not act, nor
    does its profile."""
    server = side_models_server
    listed = httpx.get(f"{server.url}/v1/loras", timeout=300).json()["data"]
    profile = {"scheduler": "tcd", "steps": 2, "guidance_scale": 0.0, "eta": 0.5}
    assert next(lora for lora in listed if lora["id"] == "tiny-sdxl-tcd-lora")["sampling"] == profile
    plain = {"prompt": "a lighthouse", "seed": 5, "width": 64, "height": 64}

    def made(**fields) -> dict:
        answer = httpx.post(f"{server.url}/v1/txt2img", json={**plain, **fields}, timeout=300)
        assert answer.status_code == 200, answer.text
        return answer.json()

    lora = [{"id": "tiny-sdxl-tcd-lora", "weight": 1.0}]
    profiled = made(loras=lora)
    assert {k: profiled["parameters"][k] for k in profile} == profile
    assert profiled["parameters"]["sampling_profile"] == "tiny-sdxl-tcd-lora"
    named = made(loras=lora, **profile)
    assert named["parameters"]["sampling_profile"] is None  # (the request named every field)
    assert b64_pixels(named["images"][0]["b64_json"]) == b64_pixels(profiled["images"][0]["b64_json"])
    own_scheduler = made(loras=lora, scheduler="euler", steps=3)["parameters"]
    assert (own_scheduler["scheduler"], own_scheduler["steps"], own_scheduler["eta"]) == ("euler", 3, None)
    assert own_scheduler["guidance_scale"] == 0.0 and own_scheduler["sampling_profile"] == "tiny-sdxl-tcd-lora"
    at_zero = made(loras=[{"id": "tiny-sdxl-tcd-lora", "weight": 0}])["parameters"]
    assert at_zero["sampling_profile"] is None and at_zero["scheduler"] == made()["parameters"]["scheduler"]


def test_two_loras_sampled_their_own_ways_need_the_request_to_choose():
    from types import SimpleNamespace

    from backends.sdxl_backend.generation.validation import sampling_profile
    from backends.sdxl_backend.protocol import SamplingProfile

    tcd, lcm = (
        SamplingProfile(scheduler="tcd", steps=4, guidance_scale=0),
        SamplingProfile(scheduler="lcm", steps=4, guidance_scale=1),
    )
    models = SimpleNamespace(loras={"a": LoraSource("a", Path("."), "", tcd), "b": LoraSource("b", Path("."), "", lcm)})
    both = [LoraWeight(id="a"), LoraWeight(id="b")]
    with pytest.raises(InvalidRequest, match="each sampled their own way") as refused:
        sampling_profile(models, GenerationRequest(prompt="x", loras=both))
    assert refused.value.param == "loras"
    chosen = GenerationRequest(prompt="x", loras=both, scheduler="euler", steps=8, guidance_scale=5)
    assert sampling_profile(models, chosen) is not None  # (nothing left for it to fill: resolve() fills nothing)
    assert sampling_profile(models, GenerationRequest(prompt="x", loras=[both[1]])) == ("b", lcm)
