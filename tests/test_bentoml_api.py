"""The service as BentoML users see it: BentoML's own clients, /schema.json, and an OpenAPI
document that validates and says what the server sends. Settings that are bad stop the start
with the variable's name."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys

import bentoml
import httpx
import pytest
from bentoml.exceptions import BentoMLException, InvalidArgument
from openapi_spec_validator import validate
from PIL import Image

from backends.api.composition.settings import Settings, SettingsError, env_name, load_settings
from tests.conftest import png_bytes
from tests.served import ROOT, start_that_fails


def test_sync_client_calls_the_native_endpoints(server):
    with bentoml.SyncHTTPClient(server.url, timeout=300) as client:
        assert {"txt2img", "img2img", "upscale"} <= set(client.endpoints)
        upscaled = client.upscale(image=base64.b64encode(png_bytes(40, 30)).decode(), upscaler="lanczos", scale=2)
        assert (upscaled["width"], upscaled["height"], upscaled["passes"]) == (80, 60, 0)
        answer = client.txt2img(prompt="a lighthouse", seed=4, n=2, width=64, height=64)
        assert [image["seed"] for image in answer["images"]] == [4, 5]
        hires = client.txt2img(
            prompt="a lighthouse", width=64, height=64, hires_fix={"scale": 1.5, "upscaler": "lanczos"}
        )
        assert (hires["images"][0]["width"], hires["parameters"]["hires_fix"]["width"]) == (96, 96)
        assert answer["parameters"]["steps"] == 4 and set(answer["timings"]) == {
            "load_s",
            "lora_load_s",
            "inference_s",
            "encode_s",
        }
        repainted = client.img2img(
            prompt="a painting", image=base64.b64encode(png_bytes(96, 64)).decode(), strength=0.5
        )
        first = Image.open(io.BytesIO(base64.b64decode(repainted["images"][0]["b64_json"])))
        assert first.size == (96, 64) and first.info["parameters"].endswith("Denoising strength: 0.5")
        mask = base64.b64encode(png_bytes(96, 64, (255, 255, 255))).decode()  # all white: repaint everything
        inpainted = client.img2img(
            prompt="a painting",
            image=base64.b64encode(png_bytes(96, 64)).decode(),
            mask=mask,
            mask_blur=0,
            masked_content="fill",
            strength=0.5,
        )
        assert (
            "Mask blur: 0"
            in Image.open(io.BytesIO(base64.b64decode(inpainted["images"][0]["b64_json"]))).info["parameters"]
        )


def test_sync_client_raises_bentoml_errors_with_the_servers_message(server):
    with bentoml.SyncHTTPClient(server.url, timeout=300) as client:
        with pytest.raises(InvalidArgument) as caught:
            client.txt2img(prompt="x", width=63)
        assert caught.value.error_code == 400
        assert json.loads(caught.value.message)["error"]["param"] == "width"
        with pytest.raises(BentoMLException) as unknown:
            client.txt2img(prompt="x", model="nope")
        assert unknown.value.error_code == 404


def test_async_client(server):
    async def call() -> dict:
        async with bentoml.AsyncHTTPClient(server.url, timeout=300) as client:
            return await client.txt2img(prompt="async", seed=9, width=64, height=64)

    assert asyncio.run(call())["images"][0]["seed"] == 9


def test_schema_json_lists_the_native_routes(server):
    schema = httpx.get(f"{server.url}/schema.json", timeout=300).json()
    routes = {route["name"]: route for route in schema["routes"]}
    assert routes["txt2img"]["route"] == "/v1/txt2img" and routes["img2img"]["route"] == "/v1/img2img"
    fields = routes["txt2img"]["input"]["properties"]
    assert fields["prompt"]["minLength"] == 1 and fields["prompt"]["description"]
    assert "image" not in fields and routes["img2img"]["input"]["required"] == ["prompt", "image"]
    assert "high" in json.dumps(fields["vram_mode"]) and "low" in json.dumps(fields["vram_mode"])


@pytest.fixture(scope="module")
def spec(server) -> dict:
    return httpx.get(f"{server.url}/docs.json", timeout=300).json()


def test_openapi_document_validates_for_the_version_it_declares(spec):
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_declared_media_types(spec):
    native = spec["paths"]["/v1/txt2img"]["post"]["responses"]
    assert {"application/json", "image/png", "image/jpeg", "image/webp"} <= set(native["200"]["content"])
    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    for operation in (spec["paths"]["/v1/jobs"]["post"], spec["paths"]["/v1/generate"]["post"]):
        # 422 only for an input image that does not decode: validation errors are 400, never FastAPI's 422
        assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


# What each route answers to a good and to a bad request; the document must declare it.
CALLS = [
    ("post", "/v1/txt2img", {"prompt": "x", "width": 64, "height": 64}),
    ("post", "/v1/txt2img", {"prompt": "x", "width": 63}),
    ("post", "/v1/txt2img", {"prompt": "x", "model": "nope"}),
    ("post", "/v1/img2img", {"prompt": "x", "image": base64.b64encode(b"not an image").decode()}),
    ("post", "/v1/generate", {"prompt": "x", "width": 64, "height": 64}),
    ("post", "/v1/generate", {"prompt": "x", "size": "big"}),
    ("post", "/v1/images/generations", {"prompt": "x", "colour": 1}),
    ("post", "/v1/jobs", {"prompt": "x", "width": 64, "height": 64, "steps": 2}),
    ("post", "/v1/jobs", {"prompt": "x", "width": 63}),
    ("get", "/v1/jobs/0123456789abcdef", None),
    ("get", "/v1/jobs?limit=0", None),
    ("get", "/v1/images/files/nope.png", None),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 2}),
    ("post", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": 3}}),
    ("get", "/v1/models", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CALLS, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(CALLS)])
def test_every_status_sent_is_declared(server, spec, method, path, body):
    response = httpx.request(method, f"{server.url}{path}", json=body, timeout=300)
    template = path.split("?")[0].replace("0123456789abcdef", "{job_id}").replace("nope.png", "{image_id}")
    declared = spec["paths"][template][method]["responses"]
    assert str(response.status_code) in declared, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_every_example_body_works_when_tried(server, spec):
    tried = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            content = (operation.get("requestBody") or {}).get("content", {}).get("application/json")
            if not content:
                continue
            schema = content["schema"]
            if "$ref" in schema:
                schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
            example = schema.get("example")
            assert example is not None, f"{method} {path} has no example"
            response = httpx.request(method, f"{server.url}{path}", json=example, timeout=300)
            assert response.status_code < 300, (path, response.text[:300])
            tried += 1
    assert tried >= 7


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    for method, path, status in [
        ("get", "/v1/chat/completions", 404),
        ("get", "/nowhere", 404),
        ("put", "/v1/models", 405),
    ]:
        response = httpx.request(method, f"{server.url}{path}", timeout=300)
        assert response.status_code == status
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["message"]


def test_a_body_that_is_not_utf8_is_a_400_in_the_error_shape(server):
    for route in ("/v1/txt2img", "/v1/generate", "/v1/jobs"):
        response = httpx.post(
            f"{server.url}{route}", content=b"\xff\xfe{", timeout=300, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, route
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_bad_settings_stop_the_start_naming_each_variable(tiny_model, tmp_path):
    bad = {
        "SDXL_MAX_QUEUE": "abc",
        "SDXL_WARMUP": "perhaps",
        "SDXL_VRAM_MODE": "turbo",
        "SDXL_MEMORY_BUDGET": "lots",
        "SDXL_QUANTIZE": "fp4",
        "SDXL_ATTENTION": "flash",
        "SDXL_COMPILE": "maybe",
        "SDXL_ALLOW_OPEN": "perhaps",
    }
    secret = {"SDXL_REDIS_URL": "http://user:hunter2@redis:6379"}  # a bad value, never shown: it may hold a password
    server = start_that_fails({"SDXL_MODELS": "tiny-sdxl", **bad, **secret}, tmp_path / "server.log")
    assert server.process.returncode != 0
    for variable, value in bad.items():  # every problem at once, not one per restart
        assert f"{variable}='{value}'" in server.log()
    assert "SDXL_REDIS_URL: String should match pattern" in server.log() and "hunter2" not in server.log()


# Read from the environment by the code they serve, not by Settings: rows of their own, marked as seams.
TEST_SEAMS = {"SDXL_TEST_FAULT_OOM", "SDXL_TEST_FAULT_DEVICE", "SDXL_TEST_PARK_FILE"}


def test_every_setting_has_its_row_in_the_configuration_page_and_every_row_a_setting():
    rows = [
        line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines() if line.startswith("| `SDXL_")
    ]
    names = {env_name(field) for field in Settings.model_fields}
    assert [name for name in sorted(names) if not any(f"`{name}`" in row.split(" | ")[0] for row in rows)] == []
    documented = {name for row in rows for name in re.findall(r"`(SDXL_\w+)`", row.split(" | ")[0])}
    assert documented - names - TEST_SEAMS == set()  # (no row for a setting that is gone)


def test_settings_read_booleans_and_lists_as_people_write_them(monkeypatch):
    monkeypatch.setenv("SDXL_WARMUP", "true")
    monkeypatch.setenv("SDXL_ALLOW_CLIENT_VRAM_MODE", "no")
    monkeypatch.setenv("SDXL_MODELS", "tiny-sdxl, sdxl-base")
    monkeypatch.setenv("SDXL_MODEL_ALIASES", "sdxl-realism=tiny-sdxl")
    monkeypatch.setenv("SDXL_API_KEYS", "key-one, key-two")
    settings = load_settings()
    assert settings.api_keys == ["key-one", "key-two"]
    assert settings.warmup is True and settings.allow_client_vram_mode is False
    assert settings.models == ["tiny-sdxl", "sdxl-base"] and settings.model_aliases == {"sdxl-realism": "tiny-sdxl"}
    monkeypatch.setenv("SDXL_MODEL_ALIASES", "sdxl-realism")
    with pytest.raises(SettingsError, match="SDXL_MODEL_ALIASES='sdxl-realism': 'sdxl-realism' is not of the form"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SDXL_DEVICES", "gpu0", "SDXL_DEVICES='gpu0': 'gpu0' is not a device"),
        ("SDXL_CORS_ORIGINS", "evil.example", "SDXL_CORS_ORIGINS='evil.example': 'evil.example' is not an origin"),
        ("SDXL_QUEUE_ORDER", "lifo", "SDXL_QUEUE_ORDER='lifo'"),
        ("SDXL_LOG_FORMAT", "xml", "SDXL_LOG_FORMAT='xml'"),
        ("SDXL_MAX_QUEUED_PER_KEY", "-1", "SDXL_MAX_QUEUED_PER_KEY='-1'"),
        ("SDXL_PRIORITY_KEYS", "not-a-key", "SDXL_PRIORITY_KEYS: every priority key must be one of SDXL_API_KEYS"),
        (
            "SDXL_UPSCALE_TILE",
            "16",
            "SDXL_UPSCALE_TILE='16': an upscale tile is 0 (never cut) or at least 32",
        ),
        ("SDXL_UPSCALE_TILE_OVERLAP", "256", "SDXL_UPSCALE_TILE_OVERLAP='256': the overlap must be under"),
    ],
)
def test_a_bad_share_device_or_origin_setting_fails_by_name(monkeypatch, variable, value, says):
    monkeypatch.setenv("SDXL_API_KEYS", "key-one")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as failed:
        load_settings()
    assert says in str(failed.value) and "key-one" not in str(failed.value) and "not-a-key" not in str(failed.value)


def test_the_service_module_loads_neither_torch_nor_diffusers(tiny_model):
    """BentoML's main process imports service.py only to read the service's definition; the
    worker loads torch and diffusers when it builds the runtime. Seconds off every start."""
    probe = "import sys, service; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SDXL_MODELS": "tiny-sdxl"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_traces_are_off_without_an_otlp_endpoint_and_a_bad_share_fails_by_name():
    from backends.api.operations.tracing import tracing_config

    assert tracing_config({}) == {}
    config = tracing_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert config["exporter_type"] == "otlp" and config["sample_rate"] == 0.25
    with pytest.raises(RuntimeError, match="OTEL_TRACES_SAMPLER_ARG='lots'"):
        tracing_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_SAMPLER_ARG": "lots"})


def test_with_api_keys_one_key_may_fill_half_the_queue_by_default():
    assert Settings(max_queue=64).queued_per_key_bound == 0  # no keys: one caller, the queue's bound alone
    assert Settings(api_keys=["a", "b"], max_queue=64).queued_per_key_bound == 32
    assert Settings(api_keys=["a"], max_queue=64, max_queued_per_key=5).queued_per_key_bound == 5
    assert Settings(api_keys=["a"], max_queue=1).queued_per_key_bound == 1
