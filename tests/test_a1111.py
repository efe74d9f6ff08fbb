"""AUTOMATIC1111 clients against a real served process (tiny-sdxl, also aliased sdxl-realism):
`webuiapi` on its defaults, and A1111 bodies as other tools send them."""

from __future__ import annotations

import base64
import io
import json
import threading

import httpx
import pytest
import webuiapi
from PIL import Image, ImageDraw

from tests.conftest import pixels, png_bytes
from tests.polling import poll

# What A1111 clients send: every field, most of them at A1111's defaults.
A1111_DEFAULTS = {
    "prompt": "a misty forest",
    "negative_prompt": "",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "Euler a",
    "scheduler": "Automatic",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 4,
    "cfg_scale": 7,
    "width": 64,
    "height": 64,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0,
    "s_min_uncond": 0,
    "s_churn": 0,
    "s_tmax": None,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "disable_extra_networks": False,
    "comments": {},
    "enable_hr": False,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}


def sdapi(server, route: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{server.url}/sdapi/v1/{route}", json=body, timeout=timeout)


def test_txt2img_with_a_full_a1111_body(server):
    response = sdapi(
        server,
        "txt2img",
        {**A1111_DEFAULTS, "seed": 5, "batch_size": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras"},
    )
    assert response.status_code == 200, response.text[:500]
    answer = response.json()
    images = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in answer["images"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [5, 6] and info["sampler_name"] == "DPM++ 2M Karras" and info["steps"] == 4
    assert answer["parameters"]["prompt"] == "a misty forest"
    again = sdapi(
        server,
        "txt2img",
        {**A1111_DEFAULTS, "seed": 5, "batch_size": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras"},
    ).json()
    assert pixels(base64.b64decode(again["images"][0])) == pixels(base64.b64decode(answer["images"][0]))
    single_name = sdapi(
        server, "txt2img", {**A1111_DEFAULTS, "seed": 5, "batch_size": 2, "sampler_name": "DPM++ 2M Karras"}
    ).json()  # (A1111 before 1.9 names the schedule in the sampler: the same pixels)
    assert pixels(base64.b64decode(single_name["images"][0])) == pixels(base64.b64decode(answer["images"][0]))


def test_random_seed_model_override_and_sampler_aliases(server):
    answer = sdapi(
        server,
        "txt2img",
        {
            **A1111_DEFAULTS,
            "sampler_name": "k_euler",
            "override_settings": {"sd_model_checkpoint": "sdxl-realism [abc123]"},
        },
    ).json()
    info = json.loads(answer["info"])
    assert 0 <= info["seed"] <= 2**32 - 1 and info["sd_model_name"] == "tiny-sdxl" and info["sampler_name"] == "Euler"


def test_img2img(server):
    image = base64.b64encode(png_bytes(96, 64)).decode()
    body = {**A1111_DEFAULTS, "init_images": [image], "steps": 10, "seed": 2, "width": 96, "height": 64}
    light = sdapi(server, "img2img", {**body, "denoising_strength": 0.3})
    heavy = sdapi(server, "img2img", {**body, "denoising_strength": 0.9})
    assert light.status_code == heavy.status_code == 200, light.text[:500]
    assert Image.open(io.BytesIO(base64.b64decode(light.json()["images"][0]))).size == (96, 64)
    assert light.json()["images"][0] != heavy.json()["images"][0]
    assert json.loads(light.json()["info"])["denoising_strength"] == 0.3


@pytest.mark.parametrize(
    ("route", "change", "param"),
    [
        ("txt2img", {"enable_hr": True, "hr_upscaler": "Nonexistent 4x"}, "hr_upscaler"),  # (not served)
        ("txt2img", {"enable_hr": True, "hr_sampler_name": "DDIM"}, "hr_sampler_name"),
        ("txt2img", {"restore_faces": True}, "restore_faces"),
        ("txt2img", {"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts.adetailer"),
        ("txt2img", {"scheduler": "Exponential"}, "scheduler"),
        ("txt2img", {"eta": 0.5}, "eta"),  # Euler a runs at eta 1.0 only
        ("txt2img", {"sampler_name": "", "sampler_index": "Warp Drive"}, "sampler_index"),
        ("txt2img", {"sampler_name": "Warp Drive"}, "sampler_name"),
        ("txt2img", {"override_settings": {"randn_source": "CPU"}}, "override_settings.randn_source"),
        ("txt2img", {"init_images": [base64.b64encode(png_bytes()).decode()]}, "init_images"),
        ("txt2img", {"width": 100}, "width"),
        ("img2img", {}, "init_images"),
        ("img2img", {"init_images": [base64.b64encode(png_bytes()).decode()]}, "denoising_strength"),
        ("img2img", {"init_images": ["%%%"]}, "init_images.0"),
    ],
)
def test_options_that_are_on_are_refused_by_name(server, route, change, param):
    response = sdapi(server, route, {**A1111_DEFAULTS, **change})
    assert response.status_code == 400, response.text[:500]
    assert response.json()["error"]["param"] == param


def test_models_samplers_options(server):
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models", timeout=300).json()
    assert [m["title"] for m in models] == ["tiny-sdxl"]
    samplers = {s["name"]: s["aliases"] for s in httpx.get(f"{server.url}/sdapi/v1/samplers", timeout=300).json()}
    assert samplers["Euler a"] == ["euler_a"] and "DPM++ SDE Karras" in samplers
    assert httpx.get(f"{server.url}/sdapi/v1/options", timeout=300).json()["sd_model_checkpoint"] == "tiny-sdxl"


# --- webuiapi, the most used A1111 client, on its defaults --------------------------------------


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", steps=4)


def test_webuiapi_txt2img_and_img2img_on_its_defaults(api):
    # Its defaults: sampler "Euler a" (also as sampler_index), scheduler "automatic", eta 1.0,
    # 512x512, and every other A1111 field at A1111's default.
    result = api.txt2img(prompt="a misty forest", seed=11)
    assert result.image.size == (512, 512)
    assert result.info["all_seeds"] == [11] and result.info["sampler_name"] == "Euler a"
    grown = api.img2img(images=[result.image], prompt="the same forest in snow", denoising_strength=0.5, seed=11)
    assert grown.image.size == (512, 512) and grown.info["denoising_strength"] == 0.5
    assert grown.image.tobytes() != result.image.tobytes()


def test_webuiapi_batches_n_iter_and_eta_where_a1111_takes_it(api):
    batches = api.txt2img(prompt="x", width=64, height=64, seed=3, batch_size=2, n_iter=2)
    assert len(batches.images) == 4 and batches.info["all_seeds"] == [3, 4, 5, 6]
    ddim = {
        eta: api.txt2img(prompt="x", width=64, height=64, seed=3, sampler_name="DDIM", eta=eta).image.tobytes()
        for eta in (0.0, 1.0)
    }
    assert ddim[0.0] != ddim[1.0]  # DDIM's eta is honoured
    with pytest.raises(RuntimeError, match="400"):
        api.txt2img(prompt="x", width=64, height=64, eta=0.3)  # Euler a: eta 1.0 only, said so


def test_webuiapi_png_info_reads_back_the_parameters(api):
    made = api.txt2img(prompt="a fox\nin a hat", negative_prompt="blurry", width=64, height=64, seed=9)
    info = api.png_info(made.image)
    assert info.info.startswith("a fox\nin a hat\nNegative prompt: blurry\n")
    parameters = info.json["parameters"]
    assert parameters["Prompt"] == "a fox\nin a hat" and parameters["Negative prompt"] == "blurry"
    assert (parameters["Seed"], parameters["Steps"], parameters["Size-1"]) == ("9", "4", "64")


def test_webuiapi_listings_options_and_skip(api):
    native = api.baseurl.removesuffix("/sdapi/v1")

    def served(kind: str) -> list[str]:  # what this server serves (the session's store may hold some)
        return sorted(adapter["id"] for adapter in httpx.get(f"{native}/v1/{kind}", timeout=300).json()["data"])

    scripts = ["controlnet"] if served("controlnets") or served("ip-adapters") else []
    assert api.get_scripts() == {"txt2img": scripts, "img2img": scripts}  # its constructor probes this
    assert sorted(lora["name"] for lora in api.get_loras()) == served("loras")
    for listing in (
        "get_sd_vae",
        "get_hypernetworks",
        "get_face_restorers",
        "get_realesrgan_models",
        "get_prompt_styles",
    ):
        assert getattr(api, listing)() == [], listing
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", *served("upscalers")]
    assert [m["name"] for m in api.get_latent_upscale_modes()] == ["Latent"]
    assert sorted(api.get_embeddings()["loaded"]) == served("embeddings") and api.get_cmd_flags() == {}
    assert [s["name"] for s in api.get_schedulers()][:2] == ["automatic", "karras"]
    assert api.get_memory()["ram"]["total"] > 0
    assert api.util_get_model_names() == ["tiny-sdxl"] and api.util_get_current_model() == "tiny-sdxl"
    assert api.refresh_checkpoints() is None and api.skip() == {}
    for route in ("refresh-vae", "refresh-loras", "refresh-embeddings", "unload-checkpoint"):
        assert api.session.post(f"{api.baseurl}/{route}", timeout=300).status_code == 200, route
    assert api.session.get(f"{api.baseurl}/extensions", timeout=300).json() == []
    api.set_options({"jpeg_quality": 80})
    assert api.get_options()["jpeg_quality"] == 80
    too_much = api.session.post(f"{api.baseurl}/options", json={"notes": "x" * 70_000}, timeout=300)
    assert too_much.status_code == 400 and too_much.json()["error"]["param"] == "options"  # kept options are bounded
    unknown = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "nope"}, timeout=300)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    with pytest.raises(RuntimeError, match="404"):  # webuiapi raises on a non-200 answer, naming its status
        api._to_api_result(unknown)


def test_webuiapi_inpainting_on_its_defaults(api):
    # Its defaults: inpainting_fill 0 ("fill"), inpaint_full_res True ("only masked"), padding 0, mask_blur 4.
    image = Image.new("RGB", (128, 128), (30, 160, 60))
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((40, 40, 87, 87), fill=255)
    for extra in ({}, {"inpaint_full_res": False, "inpainting_fill": 1}):
        result = api.img2img(
            images=[image],
            mask_image=mask,
            prompt="a stone",
            width=128,
            height=128,
            seed=1,
            denoising_strength=0.9,
            **extra,
        )
        out = result.image.convert("RGB")
        assert out.size == (128, 128)
        for corner in ((2, 2), (125, 2), (2, 125), (125, 125)):
            assert out.getpixel(corner) == image.getpixel(corner), (extra, corner)
        assert out.getpixel((64, 64)) != image.getpixel((64, 64)), extra
    with pytest.raises(RuntimeError, match="inpainting_fill"):
        api.img2img(images=[image], mask_image=mask, prompt="x", inpainting_fill=2)  # latent noise: not here


@pytest.mark.parametrize("upscaler", [webuiapi.HiResUpscaler.Latent, webuiapi.HiResUpscaler.Lanczos])
def test_webuiapi_hires_fix(api, upscaler):
    result = api.txt2img(
        prompt="a castle",
        width=64,
        height=64,
        seed=2,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=upscaler,
        denoising_strength=0.5,
    )
    assert result.image.size == (128, 128)
    assert f"Hires resize: 128x128, Hires steps: 4, Hires upscaler: {upscaler.value}" in result.image.info["parameters"]
    sized = api.txt2img(
        prompt="a castle", width=64, height=64, enable_hr=True, hr_resize_x=96, hr_resize_y=128, hr_second_pass_steps=2
    )
    assert sized.image.size == (96, 128)


def test_webuiapi_progress_and_interrupt_keep_the_image_as_it_stood(api, server):
    idle = api.get_progress()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0
    answers = []
    worker = threading.Thread(
        target=lambda: answers.append(api.txt2img(prompt="a parked one", width=64, height=64, steps=31))
    )
    with server.parked():  # (held after its first step until the interrupt)
        worker.start()
        seen = poll(api.get_progress, lambda progress: progress["state"]["sampling_step"] >= 1, 300, what="step 1")
        assert seen["state"]["sampling_steps"] == 31 and 0 < seen["progress"] < 1 and seen["eta_relative"] > 0
        assert api.interrupt() == {}
        worker.join(300)
    # A1111's behaviour: the interrupted call answers with the image as it stood.
    assert answers[0].image.size == (64, 64)
    job = next(j for j in httpx.get(f"{server.url}/v1/jobs", timeout=300).json()["jobs"] if j["total_steps"] == 31)
    assert job["status"] == "succeeded" and job["step"] == 1
    assert api.txt2img(prompt="the next one", width=64, height=64).image.size == (64, 64)  # the device goes on


def test_webuiapi_emphasis_and_long_prompts_are_read_as_a1111_reads_them(api):
    long = ", ".join(["masterpiece", "(a red fox:1.3)", "[blurry]", "((sharp focus))"] * 12)  # past 75 tokens
    emphasised = api.txt2img(prompt=long, negative_prompt="(lowres:1.2)", width=64, height=64, seed=4)
    reading = emphasised.info["prompt_reading"]
    assert reading["prompt"]["chunks"] >= 3 and reading["negative_prompt"] == {"tokens": len("lowres"), "chunks": 1}
    same_text_plain = api.txt2img(
        prompt=long.replace("(", "").replace(")", "").replace(":1.3", "").replace("[", "").replace("]", ""),
        negative_prompt="lowres",
        width=64,
        height=64,
        seed=4,
    )
    assert emphasised.image.tobytes() != same_text_plain.image.tobytes()
    assert emphasised.info["prompt"] == long  # the prompt as written
    edited = api.txt2img(prompt="a [fox:cat:0.5]", width=64, height=64, seed=4)  # prompt editing, as A1111's
    assert edited.image.tobytes() not in (
        api.txt2img(prompt="a fox", width=64, height=64, seed=4).image.tobytes(),
        api.txt2img(prompt="a cat", width=64, height=64, seed=4).image.tobytes(),
    )


def test_webuiapi_sends_forges_pag_script_and_the_png_says_pag_scale(api):
    """webuiapi passes `alwayson_scripts` through: Forge's built-in PAG script, as Forge's UI
    sends it ([enabled, scale, attenuation, start step, end step])."""
    script = {"PerturbedAttentionGuidance Integrated": {"args": [True, 3.0, 0.0, 0.0, 1.0]}}
    guided = api.txt2img(prompt="a fox", width=64, height=64, seed=3, alwayson_scripts=script)
    plain = api.txt2img(prompt="a fox", width=64, height=64, seed=3, alwayson_scripts={})
    assert guided.image.tobytes() != plain.image.tobytes()
    assert api.png_info(guided.image).json["parameters"]["PAG Scale"] == "3.0"
