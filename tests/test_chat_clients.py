"""The chat frontends people reach this server through, replayed with the exact requests each
one's own source builds (the file named beside each), with API keys off and on: SillyTavern and
Open WebUI on the A1111 dialect (HTTP Basic, the options round trip, their body fields),
LibreChat's Stable Diffusion tool (it reads `infotexts`), and the OpenAI model ids and sizes
n8n, Open WebUI and LibreChat are hard-wired to.

Open WebUI's own helpers are not called: `open_webui.routers.images` reads its configuration
and database at import and wants a running Open WebUI app (docs say so); its bodies are
replayed from that file instead."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from tests.conftest import GUARD_KEYS, image_prompt_slots, png_bytes

KEY, OTHER_KEY = GUARD_KEYS[0], GUARD_KEYS[1]


def basic(key: str, user: str = "sillytavern") -> dict[str, str]:
    """What `getBasicAuthHeader("user:key")` (SillyTavern src/util.js) and Open WebUI's
    `get_automatic1111_api_auth` send."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture(params=["keys off", "keys on"])
def target(request, server, guarded):
    """(server, headers a client with its key typed in sends): keys off, then on."""
    if request.param == "keys off":
        # SillyTavern with no auth set sends "Basic " + base64(""), its trailing space trimmed on the wire
        return server, {"Authorization": "Basic"}
    return guarded, basic(KEY)


def sillytavern_body(url: str) -> dict:
    """SillyTavern public/scripts/extensions/stable-diffusion/index.js, generateAutoImage(): its
    defaults (sampler DDIM, scheduler normal, clip skip 1, no VAE; the size and steps are the
    user's), with getSdRequestBody()'s url and auth, which src/endpoints/stable-diffusion.js
    forwards inside the txt2img body."""
    return {
        "url": url,
        "auth": "sillytavern:" + KEY,
        "prompt": "a lighthouse",
        "negative_prompt": "blurry",
        "sampler_name": "DDIM",
        "scheduler": "normal",
        "steps": 3,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "hr_additional_modules": [],
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1, "forge_additional_modules": []},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }


def test_sillytavern_lists_switches_the_model_and_generates_as_its_server_side_does(target):
    server, auth = target
    api = f"{server.url}/sdapi/v1"

    def get(path: str):
        answer = httpx.get(f"{api}/{path}", headers=auth, timeout=300)
        assert answer.status_code == 200, (path, answer.text)
        return answer.json()

    # src/endpoints/stable-diffusion.js: /ping, /upscalers, /vaes, /samplers, /schedulers, /models
    get("options")
    upscalers = [x["name"] for x in get("upscalers")]
    upscalers[1:1] = [x["name"] for x in get("latent-upscale-modes")]
    assert upscalers[:2] == ["None", "Latent"]
    assert isinstance(get("sd-vae"), list) and isinstance(get("sd-modules"), list)
    samplers, schedulers = [x["name"] for x in get("samplers")], [x["name"] for x in get("schedulers")]
    assert "DDIM" in samplers and {"automatic", "karras", "normal"} <= set(schedulers)
    title = get("sd-models")[0]["title"]
    # /set-model: POST options, then /progress until progress 0 and job_count 0 (10 tries)
    switched = httpx.post(f"{api}/options", json={"sd_model_checkpoint": title}, headers=auth, timeout=300)
    assert switched.status_code == 200, switched.text
    progress = get("progress")
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    # /generate: reads options for Forge's marker, drops forge_additional_modules unless Forge
    body = sillytavern_body(server.url)
    if "forge_preset" not in get("options"):
        del body["override_settings"]["forge_additional_modules"]
    made = httpx.post(f"{api}/txt2img", json=body, headers=auth, timeout=300)
    assert made.status_code == 200, made.text
    assert Image.open(io.BytesIO(base64.b64decode(made.json()["images"][0]))).size == (64, 64)
    info = json.loads(made.json()["info"])
    assert (info["sampler_name"], info["clip_skip"]) == ("DDIM", 2)  # clip skip 1 is SDXL's own, 2


def test_a_basic_header_with_a_wrong_key_is_refused_naming_both_ways(guarded):
    refused = httpx.get(f"{guarded.url}/sdapi/v1/options", headers=basic("wrong-key"), timeout=300)
    assert refused.status_code == 401
    assert "Bearer" in refused.json()["error"]["message"] and "Basic" in refused.json()["error"]["message"]
    for broken in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert httpx.get(f"{guarded.url}/v1/models", headers={"Authorization": broken}, timeout=300).status_code == 401
    assert httpx.get(f"{guarded.url}/v1/models", headers=basic(KEY, user=""), timeout=300).status_code == 200


def test_open_webuis_options_round_trip_belongs_to_the_callers_key(guarded):
    """open_webui/routers/images.py, set_image_model(): GET /options, change one key, POST the
    whole dict back; then image_generations() posts {prompt, batch_size, width, height}."""
    api = f"{guarded.url}/sdapi/v1"
    options = httpx.get(f"{api}/options", headers=basic(KEY, "admin"), timeout=300).json()
    assert options["sd_model_checkpoint"] == "tiny-sdxl"
    options["sd_model_checkpoint"] = "sdxl-realism"  # (an alias of tiny-sdxl here)
    options["jpeg_quality"] = 77
    posted = httpx.post(f"{api}/options", json=options, headers=basic(KEY, "admin"), timeout=300)
    assert posted.status_code == 200, posted.text
    mine = httpx.get(f"{api}/options", headers=basic(KEY, "admin"), timeout=300).json()
    assert (mine["sd_model_checkpoint"], mine["jpeg_quality"]) == ("sdxl-realism", 77)
    theirs = httpx.get(f"{api}/options", headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=300).json()
    assert theirs["sd_model_checkpoint"] == "tiny-sdxl" and "jpeg_quality" not in theirs  # one key never sees another's
    made = httpx.post(
        f"{api}/txt2img",
        json={"prompt": "a lighthouse", "batch_size": 1, "width": 64, "height": 64},
        headers=basic(KEY, "admin"),
        timeout=300,
    )
    assert made.status_code == 200, made.text
    assert json.loads(made.json()["info"])["sd_model_name"] == "tiny-sdxl"
    refused = httpx.post(f"{api}/options", json={"randn_source": "CPU"}, headers=basic(KEY), timeout=300)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "randn_source"


def test_librechats_stable_diffusion_tool_reads_infotexts_seed_and_size(server):
    """api/app/clients/tools/structured/StableDiffusion.js, _call(): its fixed payload (here at
    64x64 and 2 steps: tiny-sdxl stands for a real model), then JSON.parse(info) for
    infotexts[0] (its last line is the settings), seed, width and height."""
    payload = {"prompt": "a lighthouse", "negative_prompt": "blurry", "cfg_scale": 4.5, "steps": 2}
    made = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**payload, "width": 64, "height": 64}, timeout=300)
    assert made.status_code == 200, made.text
    info = json.loads(made.json()["info"])
    settings = info["infotexts"][0].split("\n").pop()
    assert "Steps: 2" in settings and f"Seed: {info['seed']}" in settings and "CFG scale: 4.5" in settings
    assert (info["width"], info["height"]) == (64, 64)


OPENAI_BODIES = [
    # open_webui/routers/images.py image_generations(): its default model dall-e-2, IMAGE_SIZE 512x512
    ("Open WebUI", {"model": "dall-e-2", "n": 1, "size": "512x512", "response_format": "b64_json"}, (64, 64)),
    # n8n nodes-langchain OpenAi/actions/image/generate.operation.ts: dall-e-3 and its options ...
    (
        "n8n",
        {"model": "dall-e-3", "response_format": "b64_json", "size": "1792x1024", "quality": "hd", "style": "vivid"},
        (112, 64),
    ),
    ("n8n", {"model": "gpt-image-1"}, (64, 64)),  # ... and gpt-image-1, sent without response_format
    # LibreChat api/app/clients/tools/structured/OpenAIImageTools.js, image_gen_oai
    (
        "LibreChat",
        {
            "model": "gpt-image-1",
            "n": 1,
            "background": "auto",
            "output_format": "png",
            "quality": "auto",
            "size": "auto",
        },
        (64, 64),
    ),
    ("gpt-image sizes", {"model": "gpt-image-1.5", "size": "1024x1536", "moderation": "low", "user": "u1"}, (64, 96)),
]


@pytest.mark.parametrize(("source", "body", "drawn"), OPENAI_BODIES)
def test_openais_model_ids_and_sizes_are_drawn_by_the_served_model(target, source, body, drawn):
    server, _ = target
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(
        f"{server.url}/v1/images/generations",
        json={**body, "prompt": "x", "seed": 1, "steps": 2},
        headers=headers,
        timeout=300,
    )
    assert answer.status_code == 200, (source, answer.text)
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert image.size == drawn and answer.json()["size"] == "{}x{}".format(*drawn), source
    assert answer.json()["stats"]["model"] == "tiny-sdxl"


def test_transparent_background_is_refused_by_name(server):
    answer = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"model": "gpt-image-1", "prompt": "x", "background": "transparent"},
        timeout=300,
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "background"


def test_librechats_edit_sends_image_brackets_and_more_images_than_image_prompt_models_is_a_400(server):
    """OpenAIImageTools.js, image_edit_oai: multipart model, prompt, quality, size and `image[]`."""
    form = {"model": "gpt-image-1", "prompt": "at night", "quality": "auto", "size": "auto", "seed": "3", "steps": "2"}
    one = [("image[]", ("a.png", png_bytes(64, 64), "image/png"))]
    edited = httpx.post(f"{server.url}/v1/images/edits", data=form, files=one, timeout=300)
    assert edited.status_code == 200, edited.text
    assert edited.json()["stats"]["mode"] == "img2img" and edited.json()["size"] == "64x64"
    extra = ("image[]", ("b.png", png_bytes(64, 64, (0, 0, 200)), "image/png"))
    too_many = one + [extra] * (image_prompt_slots(server.url) + 1)  # one image prompt for each IP-Adapter
    refused = httpx.post(f"{server.url}/v1/images/edits", data=form, files=too_many, timeout=300)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image[]", refused.text
    assert "IP-Adapter" in refused.json()["error"]["message"]


def test_clip_skip_reads_the_same_layer_in_every_dialect(server):
    """One setting, built once: the native field, A1111's option (Forge's reading: 1 is SDXL's
    own 2), the OpenAI extra field, MCP's argument."""
    import anyio

    from tests.conftest import pixels
    from tests.test_mcp import connected

    plain = {"prompt": "a lighthouse", "seed": 5, "width": 64, "height": 64, "steps": 2}

    def native(**more) -> bytes:
        answer = httpx.post(f"{server.url}/v1/txt2img", json={**plain, **more}, timeout=300).json()
        return pixels(base64.b64decode(answer["images"][0]["b64_json"]))

    def a1111(**more) -> bytes:
        answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={**plain, **more}, timeout=300)
        assert answer.status_code == 200, answer.text
        return pixels(base64.b64decode(answer.json()["images"][0]))

    own, last = native(), native(clip_skip=1)
    assert own == native(clip_skip=2) and last != own
    assert a1111(override_settings={"CLIP_stop_at_last_layers": 1}) == own == a1111(clip_skip=2)
    openai = httpx.post(f"{server.url}/v1/images/generations", json={**plain, "clip_skip": 1}, timeout=300).json()
    assert pixels(base64.b64decode(openai["data"][0]["b64_json"])) == last

    async def mcp():
        async with connected(server) as client:
            return await client.call_tool("generate_image", {**plain, "clip_skip": 1})

    made = anyio.run(mcp)
    assert pixels(httpx.get(made.structured_content["images"][0]["url"], timeout=30).content) == last
    refused = httpx.post(f"{server.url}/v1/txt2img", json={**plain, "clip_skip": 3}, timeout=300)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "clip_skip"  # (tiny-sdxl: 2 layers)
