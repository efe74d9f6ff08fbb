"""ControlNets: from the store, per request (txt2img, img2img, inpainting, hires fix, several at
once), through the native API and an A1111 client's `alwayson_scripts`. tiny-sdxl-controlnet,
made from tiny-sdxl's UNet with random weights, stands in for a real one."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import BackendError, InvalidRequest
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.controlnets import ControlNetSource, control_map
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.units import ControlNetUnit
from models.catalog import defaults_for
from tests.conftest import FITS_TINY_SDXL, nothing_loaded, pixels


def square_png(size: int = 64) -> bytes:
    """A white square on black: a picture with clear edges, and a control map as it is."""
    image = Image.new("RGB", (size, size))
    image.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


SQUARE = square_png()
IMG2IMG = {"image": base64.b64encode(SQUARE).decode(), "strength": 0.8, "steps": 5}
# Beside txt2img, what a request's units must work with: img2img, inpainting, a hires fix.
OTHER_TASKS = [
    IMG2IMG,
    {**IMG2IMG, "mask": base64.b64encode(SQUARE).decode()},
    {"hires_fix": {"scale": 1.5, "steps": 2}},
]


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_controlnet) -> Engine:
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    controlnet = ControlNetSource(
        "tiny-sdxl-controlnet", Path(tiny_controlnet.path), tiny_controlnet.info.labels["fits"]
    )
    return Engine(ModelManager([source], select_placement(), controlnets=[controlnet]), "tiny-sdxl")


def run(engine: Engine, *units: dict, **fields) -> bytes:
    request = GenerationRequest(
        **{"prompt": "a lighthouse", "seed": 11, **fields},
        controlnets=[{"id": "tiny-sdxl-controlnet", "image": SQUARE, **unit} for unit in units],
    )
    return pixels(engine.generate(engine.prepare(request)).images[0].data)


def test_a_controlnet_changes_the_images_and_scale_zero_gives_the_models_own(engine):
    base = run(engine)
    guided = run(engine, {})
    assert guided != base
    assert run(engine, {"scale": 0.0}) == base
    assert run(engine, {"scale": 0.5}) not in (base, guided)
    assert run(engine, {"start": 0.5}) not in (base, guided)  # guidance over the second half only
    assert run(engine, {}) == guided
    assert engine.models.loads == {"tiny-sdxl": 1, "tiny-sdxl-controlnet": 1}
    assert [c["id"] for c in engine.models.status()["controlnets"]] == ["tiny-sdxl-controlnet"]


def test_two_controlnets_at_once_and_with_image_to_image_and_inpainting(engine):
    one = run(engine, {})
    assert run(engine, {}, {"scale": 0.0}) == one  # the second one at scale 0 adds nothing
    assert run(engine, {}, {"preprocess": "canny"}) != one
    for task in OTHER_TASKS:
        assert run(engine, {}, **task) != run(engine, **task)


def test_canny_gives_an_edge_map_at_the_output_size():
    photo = Image.open(io.BytesIO(square_png(100))).convert("RGB")
    edges = np.asarray(
        control_map(photo, ControlNetUnit(id="c", image=b"x", preprocess="canny", resize_mode="stretch"), (64, 48))
    )
    assert edges.shape == (48, 64, 3)
    assert set(np.unique(edges)) == {0, 255}  # edges, and nothing else
    assert edges[24, 14:18].any() and not edges[24, 20:44].any()  # the square's left side, not its inside
    filled = np.asarray(control_map(photo, ControlNetUnit(id="c", image=b"x", resize_mode="fill"), (128, 64)))
    assert not filled[:, :30].any() and filled[32, 64].all()  # padded with black beside the picture
    cropped = np.asarray(control_map(photo, ControlNetUnit(id="c", image=b"x", resize_mode="crop"), (128, 64)))
    assert cropped.shape == (64, 128, 3) and cropped[32, 64].all()


def test_controlnets_are_checked_before_the_queue(engine, tiny_refiner):
    for unit, fields, message in [
        ({"id": "no-such-controlnet"}, {}, "unknown ControlNet 'no-such-controlnet'"),
        ({"start": 0.6, "end": 0.4}, {}, r"controlnets\[0\].end: 0.4 is not after start"),
        ({"preprocess": "canny", "low_threshold": 200, "high_threshold": 100}, {}, "is above high_threshold"),
        ({"image": base64.b64encode(b"not an image").decode()}, {}, r"controlnets\[0\].image"),
    ]:
        with pytest.raises(BackendError, match=message):
            engine.prepare(
                GenerationRequest(
                    prompt="x", controlnets=[{"id": "tiny-sdxl-controlnet", "image": SQUARE, **unit}], **fields
                )
            )
    with pytest.raises(InvalidRequest, match="guess_mode applies to the whole generation"):
        engine.prepare(
            GenerationRequest(
                prompt="x",
                controlnets=[
                    {"id": "tiny-sdxl-controlnet", "image": SQUARE},
                    {"id": "tiny-sdxl-controlnet", "image": SQUARE, "guess_mode": True},
                ],
            )
        )
    prepared = engine.prepare(
        GenerationRequest(prompt="x", controlnets=[{"id": "tiny-sdxl-controlnet", "image": SQUARE}])
    )
    assert engine.batch_key(prepared) is None  # runs alone
    assert prepared.request.controlnets[0].image == b""  # the queued request holds the map, not the upload


def without_and_with(server, plain: dict, field: str, unit: dict) -> tuple[bytes, bytes]:
    """The pixels of the native txt2img `plain`, and of `plain` with `unit` in `field`."""
    native = [
        httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=300) for body in (plain, {**plain, field: [unit]})
    ]
    assert [answer.status_code for answer in native] == [200, 200], native[1].text
    return tuple(pixels(base64.b64decode(answer.json()["images"][0]["b64_json"])) for answer in native)


@pytest.mark.served
def test_native_and_a1111_clients_send_controlnets(side_models_server):
    import webuiapi

    server = side_models_server
    before = nothing_loaded(server)
    listed = httpx.get(f"{server.url}/v1/controlnets", timeout=300).json()
    assert listed["preprocessors"] == ["none", "canny"]
    (plain_model,) = (entry for entry in listed["data"] if entry["id"] == "tiny-sdxl-controlnet")
    assert {"fits": FITS_TINY_SDXL, "loaded": False}.items() <= plain_model.items()
    square = base64.b64encode(square_png()).decode()
    unit = {
        "id": "tiny-sdxl-controlnet",
        "image": square,
        "preprocess": "canny",
        "low_threshold": 64,
        "high_threshold": 64,
        "resize_mode": "fill",
    }
    # (what webuiapi sends by default: Euler a, 20 steps, CFG 7)
    plain = {
        "prompt": "a lighthouse",
        "seed": 5,
        "width": 64,
        "height": 64,
        "scheduler": "euler_a",
        "steps": 20,
        "guidance_scale": 7.0,
    }
    unguided, guided = without_and_with(server, plain, "controlnets", unit)
    assert guided != unguided

    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    # (the extension lists IP-Adapters as unit models too; tests/test_ip_adapters.py sends them)
    adapters = httpx.get(f"{server.url}/v1/ip-adapters", timeout=300).json()["data"]
    served = [entry["id"] for entry in listed["data"] + adapters]
    assert {"tiny-sdxl-controlnet", "tiny-sdxl-ip-adapter"} <= set(served)
    assert sorted(a1111.controlnet_model_list()) == sorted(served)
    assert a1111.controlnet_module_list() == ["none", "canny", "ip-adapter-auto"]
    picture = Image.open(io.BytesIO(square_png()))
    # The client's defaults: Resize and Fill, thresholds 64 and 64, Balanced, hr_option Both.
    # (`alwayson_scripts={}` each time: webuiapi adds the units to that argument's default dict,
    # which every later call in this process would send again)
    answer = a1111.txt2img(
        prompt="a lighthouse",
        seed=5,
        width=64,
        height=64,
        alwayson_scripts={},
        controlnet_units=[webuiapi.ControlNetUnit(image=picture, module="canny", model="tiny-sdxl-controlnet")],
    )
    assert answer.image.convert("RGB").tobytes() == guided
    assert 'ControlNet 0: "Module: canny, Model: tiny-sdxl-controlnet' in answer.image.info["parameters"]
    img2img = {
        "images": [picture],
        "prompt": "a lighthouse",
        "seed": 5,
        "denoising_strength": 0.8,
        "width": 64,
        "height": 64,
    }
    plain_img2img = a1111.img2img(**img2img)
    guided_img2img = a1111.img2img(
        **img2img,
        alwayson_scripts={},
        controlnet_units=[  # without a unit image: the input image guides
            webuiapi.ControlNetUnit(module="canny", model="tiny-sdxl-controlnet [0123abcd]")
        ],
    )
    assert "ControlNet 0" not in plain_img2img.image.info["parameters"]
    assert guided_img2img.image.tobytes() != plain_img2img.image.tobytes()

    for unit, param in [
        ({"module": "depth_midas"}, "module"),
        ({"control_mode": 1}, "control_mode"),
        ({"model": "None"}, "model"),
        ({"image": ""}, "image"),
        ({"hr_option": "Low res only"}, "hr_option"),
    ]:
        body = {
            "prompt": "x",
            "alwayson_scripts": {
                "controlnet": {"args": [{"image": square, "module": "canny", "model": "tiny-sdxl-controlnet", **unit}]}
            },
        }
        refused = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=300)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == f"alwayson_scripts.controlnet.args[0].{param}"
    other_script = httpx.post(
        f"{server.url}/sdapi/v1/txt2img",
        timeout=300,
        json={"prompt": "x", "alwayson_scripts": {"ADetailer": {"args": [True]}}},
    )
    assert other_script.status_code == 400 and other_script.json()["error"]["param"] == "alwayson_scripts.adetailer"
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    assert [c["id"] for c in status["controlnets"]] == ["tiny-sdxl-controlnet"]
    # Each loaded once; nothing else the server serves at all.
    loaded = {name: count - before.get(name, 0) for name, count in status["loads"].items()}
    assert (loaded.pop("tiny-sdxl"), loaded.pop("tiny-sdxl-controlnet")) == (1, 1) and set(loaded.values()) <= {0}


@pytest.fixture(scope="module")
def union_engine(tiny_model, tiny_controlnet, tiny_union_controlnet) -> Engine:
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    controlnets = [
        ControlNetSource(m.info.labels["sdxl_id"], Path(m.path), m.info.labels["fits"])
        for m in (tiny_controlnet, tiny_union_controlnet)
    ]
    return Engine(ModelManager([source], select_placement(), controlnets=controlnets), "tiny-sdxl")


def union_run(engine: Engine, control_type: str | None, **fields) -> bytes:
    unit = {"id": "tiny-sdxl-controlnet-union", "image": SQUARE, "control_type": control_type}
    request = GenerationRequest(**{"prompt": "a lighthouse", "seed": 11, **fields}, controlnets=[unit])
    return pixels(engine.generate(engine.prepare(request)).images[0].data)


def test_a_union_controlnet_is_diffusers_union_pipeline_with_the_control_type_asked(
    union_engine, tiny_model, tiny_union_controlnet
):
    """One model for every kind of map: `control_type` picks the row of its task embedding
    (`control_mode` in diffusers' union pipelines). Served as diffusers' own union pipeline
    computes it, for each type a different picture, and in img2img, inpainting and a hires fix."""
    import torch
    from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

    from backends.sdxl_backend.models.controlnets import union_control_types

    assert union_control_types(Path(tiny_union_controlnet.path)) == 8
    assert union_control_types(Path(union_engine.models.controlnets["tiny-sdxl-controlnet"].path)) == 0
    canny = union_run(union_engine, "canny/lineart/anime_lineart/mlsd")
    pipeline = StableDiffusionXLControlNetUnionPipeline.from_pretrained(
        tiny_model.path,
        controlnet=ControlNetUnionModel.from_pretrained(tiny_union_controlnet.path),
        local_files_only=True,
    )
    defaults = defaults_for("tiny-sdxl")
    reference = pipeline(
        prompt="a lighthouse",
        control_image=[Image.open(io.BytesIO(SQUARE)).convert("RGB")],
        control_mode=[3],
        num_inference_steps=defaults.steps,
        guidance_scale=defaults.guidance_scale,
        width=defaults.width,
        height=defaults.height,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    assert canny == reference.convert("RGB").tobytes()
    assert union_run(union_engine, "depth") != canny  # (another row of its task embedding)
    for task in OTHER_TASKS:
        assert union_run(union_engine, "depth", **task) != union_run(
            union_engine, "canny/lineart/anime_lineart/mlsd", **task
        )


def test_a_union_controlnet_is_told_its_control_type_and_guides_alone(union_engine):
    union = {"id": "tiny-sdxl-controlnet-union", "image": SQUARE}
    plain = {"id": "tiny-sdxl-controlnet", "image": SQUARE}
    for units, fields, field, words in [
        ([union], {}, "controlnets[0].control_type", "is a union ControlNet"),
        ([{**plain, "control_type": "depth"}], {}, "controlnets[0].control_type", "reads one kind of map"),
        ([{**union, "control_type": "depth"}, plain], {}, "controlnets", "guides alone"),
        ([{**union, "control_type": "depth"}], {"pag_scale": 2.0}, "pag_scale", "union ControlNet"),
    ]:
        with pytest.raises(InvalidRequest, match=words) as refused:
            union_engine.prepare(GenerationRequest(prompt="x", controlnets=units, **fields))
        assert refused.value.param == field
