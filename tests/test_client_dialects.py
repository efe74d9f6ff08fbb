"""moondream-station and OpenAI Images clients against a real served process.

The gallery requests below are the bodies the public Image-Gallery-2 client sends (its
MoondreamLocalProvider and usePerformanceTest), as JSON.stringify writes them, and the answers
are read the way that client reads them.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image, ImageDraw

from tests.conftest import GUARD_KEYS, image_prompt_slots, pixels, png_bytes
from tests.polling import poll

PROMPT = "a misty forest at dawn"


def post_raw(server, route: str, payload: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}{route}", content=payload, timeout=300, headers={"Content-Type": "application/json", **headers}
    )


def gallery_image(answer: dict) -> Image.Image:
    """MoondreamLocalProvider: `data[0].b64_json || data[0].url`."""
    first = answer["data"][0]
    if first.get("b64_json"):
        return Image.open(io.BytesIO(base64.b64decode(first["b64_json"])))
    return Image.open(io.BytesIO(httpx.get(first["url"], timeout=300).content))


# --- replayed gallery requests -----------------------------------------------------------------


def test_gallery_provider_txt2img_at_its_real_size(server):
    payload = (
        b'{"prompt":"a misty forest at dawn","model":"sdxl-realism","width":1024,"height":1024,"steps":30,'
        b'"scheduler":"euler","strength":0.75}'
    )
    response = post_raw(server, "/v1/images/generations", payload)
    assert response.status_code == 200, response.text
    assert gallery_image(response.json()).size == (1024, 1024)
    stats = response.json()["stats"]
    assert (stats["model"], stats["requested_model"], stats["steps"], stats["scheduler"]) == (
        "tiny-sdxl",
        "sdxl-realism",
        30,
        "euler",
    )
    assert float(response.headers["X-Inference-Time"]) == pytest.approx(stats["inference_s"], abs=0.001)  # seconds


def test_gallery_provider_img2img(server):
    image = base64.b64encode(png_bytes(832, 1216)).decode()
    payload = (
        '{"prompt":"a misty forest at dawn","model":"sdxl-realism","width":832,"height":1216,'
        f'"steps":30,"scheduler":"euler","strength":0.75,"image":"{image}"}}'
    ).encode()
    response = post_raw(server, "/v1/images/generations", payload)
    assert response.status_code == 200, response.text
    assert gallery_image(response.json()).size == (832, 1216)
    assert response.json()["stats"]["mode"] == "img2img" and response.json()["stats"]["strength"] == 0.75


def test_gallery_performance_test_on_v1_generate(server):
    payload = (
        b'{"model":"sdxl-realism","prompt":"a misty forest at dawn","width":896,"height":512,"steps":30,'
        b'"scheduler":"euler"}'
    )
    response = post_raw(server, "/v1/generate", payload)
    assert response.status_code == 200, response.text
    answer = response.json()
    b64 = answer["data"][0]["b64_json"] or answer["images"][0]  # usePerformanceTest's read
    assert Image.open(io.BytesIO(base64.b64decode(b64))).size == (896, 512)
    inference_time_ms = float(response.headers["X-Inference-Time"])  # the gallery's inferenceTimeMs
    assert inference_time_ms == pytest.approx(answer["stats"]["inference_s"] * 1000, abs=0.1) and inference_time_ms > 0
    # (seconds, as on every route: 0.000 when the model was loaded already)
    assert response.headers["X-Model-Load-Time"] == f"{answer['stats']['load_s']:.3f}"
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    device = status["device"].partition(":")[0]  # (cpu here; cuda on a GPU)
    assert response.headers["X-Device"] == device
    assert ("X-VRAM-Used" in response.headers) == (device != "cpu")  # device memory is reported where there is one


def test_gallery_performance_test_openai_style_body(server):
    payload = (
        b'{"model":"sdxl-realism","prompt":"a misty forest at dawn","n":1,"size":"896x512",'
        b'"response_format":"b64_json"}'
    )
    answer = post_raw(server, "/v1/generate", payload).json()
    assert Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))).size == (896, 512)


def test_older_clients_read_images_or_image(server):
    answer = post_raw(server, "/v1/generate", b'{"prompt":"x","model":"sdxl-realism","width":64,"height":64}').json()
    first = answer.get("result", [None])[0] or answer["images"][0] or answer["image"]
    assert first == answer["image"] == answer["data"][0]["b64_json"]
    assert answer["created"] <= time.time() + 1


def test_vram_mode_low_frees_the_model_after_the_request(server):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    low = httpx.post(f"{server.url}/v1/generate", json=body, headers={"X-VRAM-Mode": "low"}, timeout=300)
    assert low.status_code == 200 and low.json()["stats"]["vram_mode"] == "low"
    models = httpx.get(f"{server.url}/v1/models", timeout=300).json()["models"]
    assert models[0]["loaded"] is False
    again = httpx.post(f"{server.url}/v1/generate", json=body, timeout=300)
    assert float(again.headers["X-Model-Load-Time"]) > 0
    bad = httpx.post(f"{server.url}/v1/generate", json=body, headers={"X-VRAM-Mode": "max"}, timeout=300)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-VRAM-Mode"


def test_unload_route(server):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    httpx.post(f"{server.url}/v1/generate", json=body, timeout=300)
    unloaded = httpx.post(f"{server.url}/v1/system/unload", timeout=300).json()
    assert unloaded["status"] == "success" and unloaded["unloaded"] == ["tiny-sdxl"]  # the gallery checks "success"
    assert httpx.get(f"{server.url}/v1/models", timeout=300).json()["models"][0]["loaded"] is False
    assert float(httpx.post(f"{server.url}/v1/generate", json=body, timeout=300).headers["X-Model-Load-Time"]) > 0


def test_companion_routes(server):
    assert httpx.get(f"{server.url}/health", timeout=300).json()["status"] == "ok"
    samplers = httpx.get(f"{server.url}/v1/samplers", timeout=300).json()
    assert samplers["samplers"] == samplers["schedulers"] and samplers["labels"]["euler"] == "Euler"


# The scheduler names the gallery and moondream-station's SDXL backend send, and what they are.
GALLERY_SCHEDULERS = [
    ("dpm_pp_2m_karras", "dpmpp_2m_karras"),
    ("karras", "dpmpp_2m_karras"),
    ("dpm++", "dpmpp_2m"),
    ("euler_ancestral", "euler_a"),
    ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde_karras"),
    ("beta", "dpmpp_2m_beta"),
    ("exp", "dpmpp_2m_exponential"),
    ("ays", "euler_ays"),
    ("sgm_uniform", "euler_sgm_uniform"),
    ("normal", "euler_simple"),
]


def test_gallery_scheduler_names_run_the_schedulers_they_name(server):
    body = {"prompt": PROMPT, "model": "sdxl-realism", "width": 64, "height": 64, "steps": 3, "seed": 4}
    drawn = {}
    for name, scheduler in GALLERY_SCHEDULERS:
        answer = post_raw(server, "/v1/generate", json.dumps({**body, "scheduler": name}).encode()).json()
        assert answer["stats"]["scheduler"] == scheduler and "ignored" not in answer["stats"], name
        drawn[scheduler] = gallery_image(answer).tobytes()
    assert len(set(drawn.values())) == len(drawn)  # each one its own pixels
    # The gallery sends back the first entry of the list: a string.
    first = httpx.get(f"{server.url}/v1/schedulers", timeout=300).json()["schedulers"][0]
    assert post_raw(server, "/v1/generate", json.dumps({**body, "scheduler": first}).encode()).status_code == 200
    # A name with no scheduler behind it: the model's default, and the answer says so.
    restart = post_raw(server, "/v1/generate", json.dumps({**body, "scheduler": "restart"}).encode()).json()
    assert restart["stats"]["scheduler"] == "euler" and restart["stats"]["ignored"] == {"scheduler": "restart"}


def test_each_route_as_lenient_as_its_original(server):
    body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, "upscale": False, "clientId": "abc"}
    moondream = post_raw(server, "/v1/generate", json.dumps(body).encode())
    assert moondream.status_code == 200 and moondream.json()["stats"]["ignored"] == {
        "upscale": False,
        "clientId": "abc",
    }
    openai_style = post_raw(server, "/v1/images/generations", json.dumps(body).encode())
    assert openai_style.status_code == 400 and openai_style.json()["error"]["param"] == "upscale"


def test_gallery_reads_models_vram_and_type(server):
    models = httpx.get(f"{server.url}/v1/models", timeout=300)
    assert all(m["type"] == "generation" for m in models.json()["models"])  # not taken for vision models
    assert "X-VRAM-Used" not in models.headers  # the CPU has no device memory; on CUDA: MB
    for route in ("/v1/chat/completions", "/v1/classify", "/v1/vision/batch-caption"):  # the fork's vision model
        answer = httpx.post(f"{server.url}{route}", json={}, timeout=300)
        assert answer.status_code == 404 and "generates images" in answer.json()["error"]["message"]


# --- the official openai package ------------------------------------------------------------


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_b64_json_n_images_and_size(client):
    result = client.images.generate(model="tiny-sdxl", prompt=PROMPT, n=2, size="128x64", response_format="b64_json")
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [i.size for i in images] == [(128, 64)] * 2
    assert images[0].tobytes() != images[1].tobytes()


def test_openai_url_format(client):
    result = client.images.generate(model="tiny-sdxl", prompt=PROMPT, size="64x64", response_format="url")
    fetched = httpx.get(result.data[0].url, timeout=300)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


def test_openai_extra_body_fields_and_output_format(client):
    result = client.images.generate(
        model="tiny-sdxl",
        prompt=PROMPT,
        size="64x64",
        output_format="jpeg",
        output_compression=40,
        response_format="b64_json",
        extra_body={"negative_prompt": "blur", "steps": 3, "seed": 9, "scheduler": "unipc"},
    )
    assert base64.b64decode(result.data[0].b64_json)[:2] == b"\xff\xd8"
    raw = result.model_extra["stats"]
    assert (raw["steps"], raw["seeds"], raw["scheduler"]) == (3, [9], "unipc")


def test_openai_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-sdxl", "sdxl-realism"]
    assert {m.object for m in models.data} == {"model"} and all(m.created > 0 and m.owned_by for m in models.data)
    assert client.models.retrieve("sdxl-realism").id == "sdxl-realism"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_openai_edit_with_a_mask_repaints_only_its_transparent_area(client):
    source = png_bytes(64, 64, (200, 30, 30))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=(0, 0, 0, 0))  # transparent: edit here
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    result = client.images.edit(
        image=("in.png", source, "image/png"),
        mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt=PROMPT,
        size="64x64",
        extra_body={"steps": 4, "seed": 1},
    )
    edited, original = (
        Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"),
        Image.open(io.BytesIO(source)).convert("RGB"),
    )
    for corner in ((1, 1), (62, 1), (1, 62), (62, 62)):  # far outside the (blurred) mask: unchanged
        assert edited.getpixel(corner) == original.getpixel(corner)
    assert edited.getpixel((32, 32)) != original.getpixel((32, 32))
    raw = client.images.with_raw_response.edit(
        image=("in.png", source, "image/png"), prompt=PROMPT, size="64x64", extra_body={"steps": 4}
    ).http_response.json()
    assert raw["stats"]["mode"] == "img2img"  # no mask: the whole image is edited


def test_openai_edit_takes_one_more_image_per_image_prompt_model_and_variations_need_no_prompt(client):
    images = [("a.png", png_bytes(64, 64, (200, 30, 30)), "image/png"), ("b.png", png_bytes(96, 96), "image/png")]
    edited = client.images.edit(image=images[0], prompt=PROMPT, n=2, extra_body={"steps": 4})
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size for d in edited.data] == [(64, 64)] * 2
    too_many = images + [images[1]] * image_prompt_slots(str(client.base_url).removesuffix("/v1/"))
    with pytest.raises(openai.BadRequestError) as no_adapter:  # (test_ip_adapters.py: with one, a prompt)
        client.images.edit(image=too_many, prompt=PROMPT, extra_body={"steps": 4})
    assert no_adapter.value.body["param"] == "image[]"
    variations = client.images.create_variation(image=images[0], n=2, size="64x64", extra_body={"steps": 5, "seed": 3})
    decoded = [base64.b64decode(d.b64_json) for d in variations.data]
    assert len(decoded) == 2 and pixels(decoded[0]) != pixels(decoded[1])
    with pytest.raises(openai.UnprocessableEntityError) as broken:
        client.images.create_variation(image=("a.png", b"not an image", "image/png"))
    assert "0x" not in str(broken.value)  # no Python object address in the message
    with pytest.raises(openai.BadRequestError):
        client.images.edit(image=images[0], prompt=PROMPT, extra_body={"warp": 9})  # OpenAI refuses unknown parameters


def test_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="tiny-sdxl", prompt=PROMPT, size="65x64")
    assert bad.value.body["message"] == "width: 65 is not a multiple of 8" and bad.value.body["param"] == "width"
    with pytest.raises(openai.NotFoundError, match="available models: sdxl-realism, tiny-sdxl"):
        client.images.generate(model="flux-dev", prompt=PROMPT)


# --- every field changes what it should -----------------------------------------------------


def generated_pixels(server, **fields) -> bytes:
    body = {"prompt": PROMPT, "model": "tiny-sdxl", "width": 64, "height": 64, "steps": 4, "seed": 1, **fields}
    response = httpx.post(f"{server.url}/v1/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return pixels(base64.b64decode(response.json()["images"][0]))


@pytest.mark.parametrize(
    "field",
    [
        {"seed": 2},
        {"negative_prompt": "rust"},
        {"scheduler": "dpmpp_2m"},
        {"guidance_scale": 1.0},
        {"steps": 6},
        {"prompt": "another prompt"},
        {"size": "64x72", "width": None, "height": None},
    ],
)
def test_field_changes_pixels(server, field):
    assert generated_pixels(server) == generated_pixels(server)
    assert generated_pixels(server, **field) != generated_pixels(server)


def test_strength_changes_img2img(server):
    image = base64.b64encode(png_bytes()).decode()
    assert generated_pixels(server, image=image, strength=0.5) != generated_pixels(server, image=image, strength=0.9)


def test_num_images_and_n(server):
    for count in ({"num_images": 3}, {"n": 3}, {"n": 3, "num_images": 3}):
        answer = httpx.post(
            f"{server.url}/v1/generate",
            timeout=300,
            json={"prompt": "x", "model": "tiny-sdxl", "width": 64, "height": 64, "seed": 4, **count},
        ).json()
        assert answer["stats"]["seeds"] == [4, 5, 6] and len(answer["images"]) == 3


# --- bad input --------------------------------------------------------------------------------


def _huge_header() -> str:
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"prompt": ', 400, None),
        (b'["prompt"]', 400, None),
        ({"model": "tiny-sdxl"}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x", "width": "wide"}, 400, "width"),
        ({"prompt": "x", "n": "two"}, 400, "n"),
        ({"prompt": "x", "size": "big"}, 400, "size"),
        ({"prompt": "x", "size": "1024x"}, 400, "size"),
        ({"prompt": "x", "size": "1001x1000"}, 400, "width"),
        ({"prompt": "x", "size": "64x64", "width": 128}, 400, "size"),
        ({"prompt": "x", "n": 2, "num_images": 3}, 400, "n"),
        ({"prompt": "x", "n": 11}, 400, "n"),
        ({"prompt": "x", "steps": 1000}, 400, "steps"),
        # The largest side each way (thin: a 2048x2048 picture costs seconds on the CPU, to no more end).
        ({"prompt": "x", "size": "2048x64", "width": 2048, "height": 64, "steps": 1, "model": "tiny-sdxl"}, 200, None),
        ({"prompt": "x", "size": "64x2048", "width": 64, "height": 2048, "steps": 1, "model": "tiny-sdxl"}, 200, None),
        ({"prompt": "x", "size": "4096x4096"}, 400, "width"),
        ({"prompt": "x", "response_format": "binary"}, 400, "response_format"),
        ({"prompt": "x", "background": "transparent"}, 400, "background"),
        ({"prompt": "x", "stream": True}, 400, "stream"),
        ({"prompt": "x", "image": "not base64!"}, 400, "image"),
        ({"prompt": "x", "image": base64.b64encode(png_bytes(256, 256)[:300]).decode()}, 422, "image"),
        ({"prompt": "x", "image": _huge_header()}, 413, "image"),
        ({"prompt": "x", "model": "sdxl-anime"}, 404, "model"),
    ],
)
def test_bad_input_gets_its_4xx(server, body, status, param):
    for route in ("/v1/generate", "/v1/images/generations"):
        if isinstance(body, bytes):
            response = post_raw(server, route, body)
        else:
            response = httpx.post(f"{server.url}{route}", json=body, timeout=300)
        assert response.status_code == status, response.text[:500]
        if status >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["param"] == param and error["message"]
    assert (
        httpx.post(
            f"{server.url}/v1/generate", json={"prompt": "ok", "width": 64, "height": 64}, timeout=300
        ).status_code
        == 200
    )


# --- keys, CORS, kept images: a server configured for them -----------------------------------

KEY = GUARD_KEYS[0]


def test_api_keys(guarded):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    url = f"{guarded.url}/v1/generate"
    missing = httpx.post(url, json=body, timeout=300)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=300).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300).status_code == 200
    assert httpx.post(url, json=body, headers={"X-API-Key": "other-key"}, timeout=300).status_code == 200
    assert httpx.post(f"{guarded.url}/v1/system/unload", timeout=300).status_code == 401
    assert httpx.post(f"{guarded.url}/v1/txt2img", json=body, timeout=300).status_code == 401
    for open_route in ("/health", "/readyz", "/livez"):
        assert httpx.get(f"{guarded.url}{open_route}", timeout=300).status_code == 200, open_route
    assert KEY not in guarded.log()


def test_json_log_lines_carry_the_access_fields_and_no_secrets(guarded):
    secret_prompt = "a lighthouse drawn for the log test 7f3a"
    body = {"prompt": secret_prompt, "width": 64, "height": 64, "steps": 1}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{guarded.url}/v1/txt2img", json=body, headers=headers, timeout=300).status_code == 200

    def json_lines() -> list[dict]:
        worker_lines = [line for line in guarded.log().splitlines() if line.startswith('{"time": ')]
        return [json.loads(line) for line in worker_lines]  # (every one of them parses)

    def txt2img_access(lines: list[dict]) -> list[dict]:
        return [
            line
            for line in lines
            if line["logger"] == "backends.api.edge.middleware.access" and line["route"] == "/v1/txt2img"
        ]

    # (the access line is written once the answer is sent)
    lines = poll(json_lines, lambda lines: txt2img_access(lines), 60, 0.2, "the access line")
    access = txt2img_access(lines)
    assert access[-1]["method"] == "POST" and access[-1]["status"] == 200
    assert not [line for line in lines if line["message"] == "a job observer failed"]  # (metrics and webhooks)
    assert access[-1]["duration_ms"] > 0 and access[-1]["level"] == "info"
    assert any(
        line["logger"] == "backends.api.composition.runtime" and "models: tiny-sdxl" in line["message"]
        for line in lines
    )
    assert secret_prompt not in guarded.log() and KEY not in guarded.log()


def test_openai_client_with_key(guarded):
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    assert client.images.generate(prompt="x", size="64x64").data[0].b64_json
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0).images.generate(prompt="x")


def test_cors_preflight_and_exposed_headers(guarded):
    preflight = httpx.options(
        f"{guarded.url}/v1/images/generations",
        headers={
            "Origin": "http://gallery.local",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization,x-vram-mode",
        },
        timeout=300,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://gallery.local"
    assert "x-vram-mode" in preflight.headers["access-control-allow-headers"].lower()
    stranger = httpx.options(
        f"{guarded.url}/v1/images/generations",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=300,
    )
    assert "access-control-allow-origin" not in stranger.headers
    answer = httpx.post(
        f"{guarded.url}/v1/generate",
        timeout=300,
        json={"prompt": "x", "width": 64, "height": 64},
        headers={"Origin": "http://gallery.local", "X-API-Key": KEY},
    )
    refused = httpx.post(
        f"{guarded.url}/v1/generate", timeout=300, json={"prompt": "x"}, headers={"Origin": "http://gallery.local"}
    )  # no key: the edge's own 401
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://gallery.local"
    exposed = answer.headers["access-control-expose-headers"]
    for header in ("X-Inference-Time", "X-Model-Load-Time", "X-VRAM-Used", "X-VRAM-Total", "X-Seed"):
        assert header in exposed


def test_kept_image_url_expires(guarded):
    answer = httpx.post(
        f"{guarded.url}/v1/images/generations",
        timeout=300,
        headers={"X-API-Key": KEY},
        json={"prompt": "x", "size": "64x64", "response_format": "url", "output_format": "webp"},
    ).json()
    url = answer["data"][0]["url"]
    assert url.startswith(f"{guarded.url}/v1/images/files/") and url.endswith(".webp")
    assert answer["images"] == [url] and answer["image"] == url
    kept = httpx.get(url, timeout=300)  # no key: links are fetched by browsers
    assert kept.status_code == 200 and kept.headers["content-type"] == "image/webp"
    time.sleep(3.5)
    assert httpx.get(url, timeout=300).status_code == 410
    assert httpx.get(f"{guarded.url}/v1/images/files/never-made.png", timeout=300).status_code == 404


def test_gallery_recreate_prompt_of_300_words_reaches_the_model(server):
    """The gallery's "recreate this image" prompt: a vision model's description, paragraphs
    joined; every word of it is read (in chunks), and a word at its end changes the image."""
    description = " ".join(
        ["A quiet harbour at dawn, with fishing boats resting on still water and gulls overhead."] * 20
    )
    assert len(description.split()) >= 300
    answers = [
        post_raw(
            server,
            "/v1/generate",
            json.dumps(
                {
                    "model": "sdxl-realism",
                    "prompt": f"{description} {last}",
                    "width": 64,
                    "height": 64,
                    "steps": 4,
                    "scheduler": "euler",
                    "seed": 8,
                }
            ).encode(),
        )
        for last in ("red", "blue")
    ]
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
    stats = answers[0].json()["stats"]
    reading = stats["prompt_reading"]["prompt"]  # (tiny-sdxl: a token a character, spaces aside)
    assert reading["chunks"] * 75 >= reading["tokens"] > 1000 and reading["chunks"] >= 20
    images = [gallery_image(answer.json()).tobytes() for answer in answers]
    assert images[0] != images[1]


def test_with_keys_an_upscale_job_is_its_keys_alone(guarded):
    """With API keys on, an upscale needs a key, becomes a job of that key, and another key
    neither lists it nor can look at it (as for a generation)."""
    upscale = {"image": base64.b64encode(png_bytes(40, 30)).decode(), "upscaler": "lanczos", "scale": 2}
    assert httpx.post(f"{guarded.url}/v1/upscale", json=upscale, timeout=300).status_code == 401
    mine, theirs = {"Authorization": f"Bearer {GUARD_KEYS[2]}"}, {"Authorization": f"Bearer {GUARD_KEYS[3]}"}
    answer = httpx.post(f"{guarded.url}/v1/upscale", json=upscale, headers=mine, timeout=300)
    assert answer.status_code == 200 and (answer.json()["width"], answer.json()["height"]) == (80, 60)

    def upscales(headers) -> list[dict]:
        listed = httpx.get(f"{guarded.url}/v1/jobs", headers=headers, timeout=300).json()["jobs"]
        return [job for job in listed if job["kind"] == "upscale"]

    (own,) = upscales(mine)
    assert own["status"] == "succeeded" and upscales(theirs) == []
    assert httpx.get(f"{guarded.url}/v1/jobs/{own['id']}", headers=theirs, timeout=300).status_code == 404
