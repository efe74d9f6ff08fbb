"""The backend on its own (no HTTP, no BentoML serving): the tiny model from the real store."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import (
    BackendError,
    Cancelled,
    InvalidImage,
    InvalidRequest,
    PayloadTooLarge,
    UnknownModel,
)
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.models.schedulers import SCHEDULERS
from backends.sdxl_backend.protocol import GenerationRequest
from models.catalog import defaults_for
from tests.conftest import pixels, png_bytes


@pytest.fixture(scope="module")
def engine(tiny_model):
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(ModelManager([source], select_placement()), "tiny-sdxl")


def run(engine: Engine, **fields):
    return engine.generate(engine.prepare(GenerationRequest(prompt=fields.pop("prompt", "a red fox"), **fields)))


def test_same_seed_same_pixels_and_other_seed_other_pixels(engine):
    first = run(engine, seed=42)
    again = run(engine, seed=42)
    other = run(engine, seed=43)
    assert pixels(first.images[0].data) == pixels(again.images[0].data)
    assert pixels(first.images[0].data) != pixels(other.images[0].data)


def test_random_seed_is_chosen_and_returned(engine):
    result = run(engine)
    assert result.request.seed == result.images[0].seed
    assert run(engine, seed=result.request.seed).images[0].data == result.images[0].data


def test_n_images_in_one_batch_have_consecutive_seeds_and_match_single_runs(engine):
    result = run(engine, seed=100, n=3)
    assert result.seeds == [100, 101, 102]
    assert len({pixels(image.data) for image in result.images}) == 3
    single = run(engine, seed=101)
    # Batched and single runs differ by float rounding only.
    a = Image.open(io.BytesIO(result.images[1].data)).convert("L")
    b = Image.open(io.BytesIO(single.images[0].data)).convert("L")
    assert max(abs(x - y) for x, y in zip(a.getdata(), b.getdata())) <= 2


def max_difference(a: bytes, b: bytes) -> int:
    first, second = (Image.open(io.BytesIO(data)).convert("RGB").tobytes() for data in (a, b))
    return max(abs(x - y) for x, y in zip(first, second))


def counting_calls(engine: Engine, monkeypatch) -> list[int]:
    """The number of images of each pipeline call the engine makes."""
    calls: list[int] = []
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        for pipeline in (pipelines.txt2img, pipelines.img2img):
            original = type(pipeline).__call__

            def counted(self, *args, _original=original, **kwargs):
                calls.append(len(kwargs["generator"]))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(type(pipeline), "__call__", counted)
    return calls


def test_a_batch_is_one_call_and_each_request_keeps_its_seeds_and_pixels(engine, monkeypatch):
    requests = [
        GenerationRequest(prompt="a red fox", seed=7, steps=4),
        GenerationRequest(prompt="a blue bird", seed=8, n=2, steps=4, output_format="jpeg"),
        GenerationRequest(prompt="a green tree", seed=9, steps=4),
    ]
    alone = [engine.generate(engine.prepare(request)) for request in requests]
    prepared = [engine.prepare(request) for request in requests]
    assert len({engine.batch_key(p) for p in prepared}) == 1
    calls = counting_calls(engine, monkeypatch)
    batched = engine.generate_batch([(p, None) for p in prepared])
    assert calls == [4]
    for one, together in zip(alone, batched):
        assert together.seeds == one.seeds and together.batch_images == 4 and one.batch_images == len(one.seeds)
        assert together.images[0].media_type == one.images[0].media_type
        for a, b in zip(one.images, together.images):
            # The same noise (per-image CPU generators); the CPU's batched arithmetic rounds a
            # little differently (docs/benchmarks.md gives the measured difference).
            assert max_difference(a.data, b.data) <= 3


@pytest.mark.parametrize(
    "other",
    [
        {"steps": 5},
        {"width": 72},
        {"guidance_scale": 2.0},
        {"scheduler": "ddim"},
        {"image": png_bytes()},
        {"hires_fix": {"scale": 1.5}},
        {"prompt": "b " * 80},
        {"negative_prompt": "b BREAK c"},
    ],
)  # (more chunks)
def test_requests_that_differ_in_the_call_do_not_batch(engine, other):
    base = engine.prepare(GenerationRequest(prompt="a", steps=4, width=64, height=64))
    assert engine.batch_key(base) != engine.batch_key(
        engine.prepare(GenerationRequest(**{"prompt": "b", "steps": 4, "width": 64, "height": 64, **other}))
    )


def test_img2img_requests_batch_with_their_own_input_images(engine, monkeypatch):
    requests = [
        GenerationRequest(prompt="x", image=png_bytes(64, 64, colour), strength=0.5, steps=4, seed=3)
        for colour in ((200, 30, 30), (30, 30, 200))
    ]
    alone = [engine.generate(engine.prepare(request)) for request in requests]
    prepared = [engine.prepare(request) for request in requests]
    calls = counting_calls(engine, monkeypatch)
    batched = engine.generate_batch([(p, None) for p in prepared])
    assert calls == [2] and batched[0].img2img and batched[0].batch_images == 2
    assert max_difference(batched[0].images[0].data, batched[1].images[0].data) > 10
    for one, together in zip(alone, batched):
        assert max_difference(one.images[0].data, together.images[0].data) <= 3


def test_a_request_cancelled_inside_a_batch_is_dropped_and_the_others_finish(engine):
    prepared = [engine.prepare(GenerationRequest(prompt=p, steps=4, seed=1)) for p in ("a", "b", "c")]
    steps: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def observer(index: int):
        def on_step(step, total, latents):
            assert latents.shape[0] == 1  # its own rows of the batch's latents
            steps[index].append(step)
            if index == 1 and step == 2:
                raise Cancelled("cancelled in the test")

        return on_step

    outcomes = engine.generate_batch([(p, observer(i)) for i, p in enumerate(prepared)])
    assert isinstance(outcomes[1], Cancelled) and steps[1] == [1, 2]
    assert [len(outcomes[i].images) for i in (0, 2)] == [1, 1] and steps[0] == steps[2] == [1, 2, 3, 4]


def test_model_defaults_fill_open_fields(engine):
    result = run(engine)
    defaults = defaults_for("tiny-sdxl")
    assert (result.request.width, result.request.height) == (defaults.width, defaults.height)
    assert result.request.steps == defaults.steps
    assert result.request.scheduler == defaults.scheduler
    assert result.model == "tiny-sdxl"


def test_scheduler_changes_pixels_and_does_not_leak_into_next_request(engine):
    euler = run(engine, seed=7, scheduler="euler")
    dpm = run(engine, seed=7, scheduler="dpmpp_2m_karras")
    after = run(engine, seed=7)  # default scheduler again
    assert pixels(euler.images[0].data) != pixels(dpm.images[0].data)
    assert pixels(after.images[0].data) == pixels(euler.images[0].data)


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"euler"}))
def test_every_scheduler_runs_and_draws_its_own_pixels(engine, name):
    result = run(engine, seed=1, scheduler=name, steps=3)
    assert result.request.scheduler == name
    assert result.images[0].width == 64
    assert pixels(result.images[0].data) != pixels(run(engine, seed=1, scheduler="euler", steps=3).images[0].data)


def test_align_your_steps_takes_its_sigmas_also_for_img2img(engine):
    txt = run(engine, seed=2, scheduler="euler_ays", steps=7)
    assert txt.request.steps == 7
    img = run(engine, seed=2, scheduler="euler_ays", steps=10, image=png_bytes(64, 64), strength=0.5)
    assert pixels(img.images[0].data) != pixels(txt.images[0].data)


def square_mask(size: int, box: tuple[int, int, int, int]) -> bytes:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_inpainting_repaints_inside_the_mask_and_keeps_the_rest(engine):
    source = png_bytes(128, 128, (40, 120, 200))
    box = (32, 32, 95, 95)
    for fields in ({}, {"masked_content": "fill"}, {"masked_area_only": True, "masked_area_padding": 8}):
        result = run(
            engine, seed=3, steps=8, strength=0.9, image=source, mask=square_mask(128, box), mask_blur=0, **fields
        )
        assert result.inpainting and result.images[0].width == 128
        out, before = rgb(result.images[0].data), rgb(source)
        outside = [
            (x, y)
            for x in range(0, 128, 7)
            for y in range(0, 128, 7)
            if not (box[0] - 2 <= x <= box[2] + 2 and box[1] - 2 <= y <= box[3] + 2)
        ]
        assert all(out.getpixel(p) == before.getpixel(p) for p in outside), fields  # kept exactly
        inside = [(x, y) for x in range(40, 88, 6) for y in range(40, 88, 6)]
        assert sum(out.getpixel(p) != before.getpixel(p) for p in inside) > len(inside) // 2, fields
    text = Image.open(io.BytesIO(result.images[0].data)).text["parameters"]
    assert "Mask blur: 0" in text and "Inpaint area: Only masked" in text


def test_masked_area_only_repaints_at_full_resolution_and_differs(engine):
    source, mask = png_bytes(128, 128, (40, 120, 200)), square_mask(128, (48, 48, 79, 79))
    whole = run(engine, seed=3, steps=8, strength=0.9, image=source, mask=mask, mask_blur=0)
    cropped = run(
        engine,
        seed=3,
        steps=8,
        strength=0.9,
        image=source,
        mask=mask,
        mask_blur=0,
        masked_area_only=True,
        masked_area_padding=0,
    )
    assert pixels(whole.images[0].data) != pixels(cropped.images[0].data)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"mask": b"png?"}, "mask"),  # no image to paint into
        ({"image": b"", "mask": b""}, "image"),
    ],
)
def test_inpainting_refusals_name_the_field(engine, fields, param):
    with pytest.raises(BackendError) as refused:
        engine.prepare(GenerationRequest(prompt="x", **fields))
    assert refused.value.param == param


def test_an_all_black_mask_is_refused(engine):
    with pytest.raises(BackendError, match="all black"):
        engine.prepare(GenerationRequest(prompt="x", image=png_bytes(), mask=png_bytes(color=(0, 0, 0))))


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix_runs_a_second_pass_at_the_larger_size(engine, upscaler):
    prepared = engine.prepare(
        GenerationRequest(
            prompt="a red fox",
            seed=5,
            steps=4,
            width=64,
            height=64,
            hires_fix={"scale": 2, "upscaler": upscaler, "strength": 0.5},
        )
    )
    assert prepared.total_steps == 4 + 2
    seen = []
    result = engine.generate(prepared, lambda step, total, latents: seen.append((step, total)))
    assert (result.images[0].width, result.images[0].height) == (128, 128)
    assert seen == [(step, 6) for step in range(1, 7)]  # the two passes read as one run
    text = Image.open(io.BytesIO(result.images[0].data)).text["parameters"]
    assert f"Hires resize: 128x128, Hires steps: 4, Hires upscaler: {upscaler.title()}" in text
    plain = run(engine, seed=5, steps=4, width=128, height=128)
    assert pixels(plain.images[0].data) != pixels(result.images[0].data)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"hires_fix": {"scale": 4}, "width": 1024, "height": 1024}, "hires_fix.width"),  # past the size limit
        ({"hires_fix": {"width": 32, "height": 32}, "width": 64, "height": 64}, "hires_fix.width"),
        ({"hires_fix": {"width": 64, "height": 64}, "width": 128, "height": 128}, "hires_fix"),  # smaller
        ({"hires_fix": {"strength": 0.1, "steps": 4}}, "hires_fix.strength"),
        ({"hires_fix": {}, "image": png_bytes()}, "hires_fix"),
    ],
)
def test_hires_fix_refusals_name_the_field(engine, fields, param):
    with pytest.raises(InvalidRequest) as refused:
        engine.prepare(GenerationRequest(prompt="x", **fields))
    assert refused.value.param == param


def test_img2img_strength_changes_output_and_keeps_size(engine):
    init = png_bytes(96, 64)
    light = run(engine, seed=5, image=init, strength=0.3, steps=10)
    heavy = run(engine, seed=5, image=init, strength=0.9, steps=10)
    assert (light.images[0].width, light.images[0].height) == (96, 64)
    assert pixels(light.images[0].data) != pixels(heavy.images[0].data)


def test_output_formats_and_png_parameters(engine):
    png = run(engine, seed=9, negative_prompt="blurry")
    text = Image.open(io.BytesIO(png.images[0].data)).text["parameters"]
    assert "a red fox" in text and "Negative prompt: blurry" in text and "Seed: 9" in text
    for fmt, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        result = run(engine, seed=9, output_format=fmt, quality=50)
        assert result.images[0].data.startswith(magic)
        assert result.images[0].media_type == f"image/{fmt}"


def test_negative_prompt_changes_pixels(engine):
    plain = run(engine, seed=3)
    negative = run(engine, seed=3, negative_prompt="green")
    assert pixels(plain.images[0].data) != pixels(negative.images[0].data)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"width": 100}, "width"),
        ({"height": 32}, "height"),
        ({"width": 4096}, "width"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"n": 11}, "n"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"negative_prompt": "x" * 4001}, "negative_prompt"),
        ({"scheduler": "warp-drive"}, "scheduler"),
        ({"image": png_bytes(), "strength": 0.1, "steps": 5}, "strength"),
    ],
)
def test_validation_errors_name_the_field(engine, fields, param):
    with pytest.raises(InvalidRequest) as caught:
        run(engine, **fields)
    assert caught.value.param == param
    assert caught.value.message.startswith(param)


def test_pixel_budget_is_checked_on_the_product():
    limits = Limits(max_pixels=128 * 128)
    from backends.sdxl_backend.generation.validation import validate

    request = GenerationRequest(prompt="x", width=256, height=128, steps=1, guidance_scale=1, scheduler="euler", seed=1)
    with pytest.raises(InvalidRequest, match="over the limit"):
        validate(request, limits)


def test_unknown_model(engine):
    with pytest.raises(UnknownModel) as caught:
        run(engine, model="sdxl-nope")
    assert caught.value.available == ["tiny-sdxl"]


def test_bad_images_are_refused_before_model_work(engine):
    with pytest.raises(InvalidImage):
        run(engine, image=b"not an image at all")
    with pytest.raises(InvalidImage):
        run(engine, image=png_bytes(256, 256)[:200])  # truncated
    huge = io.BytesIO()
    Image.new("1", (10000, 10000)).save(huge, format="PNG")  # 100 megapixels, a few kB
    with pytest.raises(PayloadTooLarge, match="pixels"):
        run(engine, image=huge.getvalue())


def test_base64_and_data_url_images_are_accepted():
    import base64

    raw = png_bytes()
    encoded = base64.b64encode(raw).decode()
    assert GenerationRequest(prompt="x", image=encoded).image == raw
    assert GenerationRequest(prompt="x", image="data:image/png;base64," + encoded).image == raw
    with pytest.raises(ValueError, match="base64"):
        GenerationRequest(prompt="x", image="***")


@pytest.mark.parametrize("fields", [{"width": 0}, {"height": 0}, {"steps": 0}])
def test_zero_is_refused_not_replaced_by_the_default(engine, fields):
    with pytest.raises((InvalidRequest, ValueError)):
        engine.prepare(GenerationRequest(prompt="x", **fields))


def test_prepare_checks_everything_before_the_device(engine):
    """A bad request fails in prepare, which loads nothing: the manager's load count stays."""
    loads = dict(engine.models.loads)
    with pytest.raises(InvalidRequest):
        engine.prepare(GenerationRequest(prompt="x", width=63))
    prepared = engine.prepare(GenerationRequest(prompt="x", image=png_bytes(96, 64), strength=0.5, steps=8))
    assert prepared.init_image.size == (96, 64) and prepared.total_steps == 4
    assert prepared.request.image is None  # the bytes are not carried to the device
    assert engine.models.loads == loads


def test_outpainting_grows_the_image_and_keeps_the_input_outside_the_seam(engine):
    red = png_bytes(64, 64, (200, 30, 30))
    outpaint = {"right": 32, "fill": "edge"}
    prepared = engine.prepare(GenerationRequest(prompt="a red wall", image=red, outpaint=outpaint, steps=4))
    assert prepared.request.strength == 1.0 and prepared.init_image.size == (96, 64)
    result = engine.generate(prepared)
    image = rgb(result.images[0].data)
    assert image.size == (96, 64) and (result.request.width, result.request.height) == (96, 64)
    kept = np.asarray(prepared.mask) == 0  # where the seam's blur does not reach: the input as it was
    assert kept[:, :48].all() and not kept[:, 64:].any()
    assert (np.asarray(image)[:, :64][kept[:, :64]] == np.asarray(rgb(red))[kept[:, :64]]).all()
    assert (np.asarray(image)[:, 64:] != np.asarray(rgb(red))[:, :32]).any()  # the new area is painted
    for fields, message in (
        ({"outpaint": {}}, "at least one margin"),
        ({"outpaint": {"right": 32}, "mask": red}, "not with a mask"),
        ({"outpaint": {"right": 32}, "width": 96}, "leave width and height out"),
    ):
        with pytest.raises(InvalidRequest, match=message) as refused:
            engine.prepare(GenerationRequest(prompt="x", image=red, **fields))
        assert refused.value.param == "outpaint"
