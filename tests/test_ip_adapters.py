"""IP-Adapters (image prompts): from the store, per request (txt2img, img2img, inpainting, hires
fix), in batches, through the native API, the job queue, /v1/generate and an A1111 client's
ControlNet units. tiny-sdxl-ip-adapter, random weights and a tiny CLIP image encoder made for
tiny-sdxl's UNet, stands in for a real one."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import BackendError
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.controlnets import ControlNetSource
from backends.sdxl_backend.models.ip_adapters import ENCODER_FOLDER, IP_ADAPTER_FILE, IpAdapterSource
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from models.catalog import defaults_for, load_catalog
from tests.conftest import FITS_TINY_SDXL, hub_snapshot, nothing_loaded, pixels, png_bytes
from tests.test_backend import counting_calls, max_difference
from tests.test_controlnets import OTHER_TASKS, SQUARE, without_and_with
from tests.test_jobs import LONG, get, submit, wait

ADAPTER = "tiny-sdxl-ip-adapter"
CONTROLNET = "tiny-sdxl-controlnet"
RED = png_bytes(48, 48, (220, 40, 40))


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_ip_adapter, tiny_refiner, tiny_controlnet) -> Engine:
    sources = [
        ModelSource(model.info.labels["sdxl_id"], Path(model.path), defaults_for(model.info.labels["sdxl_id"]))
        for model in (tiny_model, tiny_refiner)
    ]
    adapter = IpAdapterSource(ADAPTER, Path(tiny_ip_adapter.path), tiny_ip_adapter.info.labels["fits"])
    controlnet = ControlNetSource(CONTROLNET, Path(tiny_controlnet.path), tiny_controlnet.info.labels["fits"])
    return Engine(
        ModelManager(sources, select_placement(), controlnets=[controlnet], ip_adapters=[adapter]), "tiny-sdxl"
    )


def request(*units: dict, **fields) -> GenerationRequest:
    return GenerationRequest(
        **{"prompt": "a lighthouse", "seed": 11, **fields},
        ip_adapters=[{"id": ADAPTER, "image": SQUARE, **unit} for unit in units],
    )


def run(engine: Engine, *units: dict, **fields) -> bytes:
    return pixels(engine.generate(engine.prepare(request(*units, **fields))).images[0].data)


def test_an_image_prompt_changes_the_images_and_scale_zero_gives_the_models_own(engine):
    plain = run(engine)
    prompted = run(engine, {})
    assert prompted != plain
    assert run(engine, {"scale": 0.0}) == plain  # installed, adding nothing
    assert run(engine) == plain  # taken out again: the UNet as it was loaded
    assert run(engine, {"scale": 1.2}) not in (plain, prompted)
    assert run(engine, {"image": base64.b64encode(RED).decode()}) not in (plain, prompted)  # the picture counts
    assert run(engine, {}) == prompted
    assert run(engine, {}, guidance_scale=0) != run(engine, guidance_scale=0)  # unguided calls too
    assert engine.models.loads[ADAPTER] == 1  # loaded once, kept
    assert [a["id"] for a in engine.models.status()["ip_adapters"]] == [ADAPTER]


def test_an_install_that_fails_half_way_is_taken_out_by_the_next_call(engine, monkeypatch):
    """Out of memory while the adapter's layers go into the UNet, after diffusers has swapped
    the attention processors: the request is run again in the next memory mode, which finds
    the UNet half-installed and puts it right; then a request without an image prompt still
    gets the model's own pixels."""
    from diffusers import UNet2DConditionModel

    plain = run(engine)  # (the UNet as loaded: the next call installs the adapter)
    load, failed = UNet2DConditionModel._load_ip_adapter_weights, []

    def fails_once_half_way(unet, weights, **kwargs):
        if failed:
            return load(unet, weights, **kwargs)
        failed.append(True)
        unet.set_attn_processor(unet._convert_ip_adapter_attn_to_diffusers(weights))
        raise torch.OutOfMemoryError("CUDA out of memory (a test double for the device's error)")

    monkeypatch.setattr(UNet2DConditionModel, "_load_ip_adapter_weights", fails_once_half_way)
    recovered = engine.generate(engine.prepare(request({})))
    assert failed and recovered.out_of_memory_in == ["high"]
    assert pixels(recovered.images[0].data) == run(engine, {}, vram_mode=recovered.vram_mode)
    assert run(engine) == plain


def test_image_prompts_with_image_to_image_inpainting_the_hires_fix_the_refiner_and_controlnets(engine):
    refined = {"refiner": {"model": "tiny-sdxl-refiner", "switch_at": 0.5}}  # (the base's part only)
    for task in [*OTHER_TASKS, refined]:
        assert run(engine, {}, **task) != run(engine, **task)
    for task in ({}, *OTHER_TASKS[:2]):  # (the ControlNet pipelines take image prompts too)
        guided = {**task, "controlnets": [{"id": CONTROLNET, "image": base64.b64encode(SQUARE).decode()}]}
        assert run(engine, {}, **guided) != run(engine, **guided)


def test_requests_with_one_image_prompt_batch_and_others_never_share_their_call(engine, monkeypatch):
    requests = [request({}, seed=3), request({}, prompt="a harbour", seed=4, n=2)]
    alone = [engine.generate(engine.prepare(one)) for one in requests]
    prepared = [engine.prepare(one) for one in requests]
    assert engine.batch_key(prepared[0]) == engine.batch_key(prepared[1])
    calls = counting_calls(engine, monkeypatch)
    batched = engine.generate_batch([(p, None) for p in prepared])
    assert calls == [3] and batched[0].batch_images == 3
    for one, together in zip(alone, batched):
        for a, b in zip(one.images, together.images):
            assert max_difference(a.data, b.data) <= 3
    # Another adapter set, scale or picture is another call: the UNet holds one set at one
    # scale, and the pipeline gives every image of a call the same picture.
    key = engine.batch_key(prepared[0])
    assert engine.batch_key(engine.prepare(request(seed=3))) != key
    assert engine.batch_key(engine.prepare(request({"scale": 0.3}, seed=3))) != key
    assert engine.batch_key(engine.prepare(request({"image": base64.b64encode(RED).decode()}, seed=3))) != key


def test_image_prompts_are_checked_before_the_queue(engine):
    for unit, fields, message in [
        ({"id": "no-such-adapter"}, {}, r"ip_adapters\[0\].id: unknown IP-Adapter 'no-such-adapter'"),
        ({"image": base64.b64encode(b"not an image").decode()}, {}, r"ip_adapters\[0\].image"),
        ({}, {"model": "tiny-sdxl-refiner", "image": base64.b64encode(SQUARE).decode()}, "does not fit model"),
    ]:
        with pytest.raises(BackendError, match=message):
            engine.prepare(request({**unit}, **fields))
    with pytest.raises(BackendError, match=r"ip_adapters\[1\].id: 'tiny-sdxl-ip-adapter' is named twice"):
        engine.prepare(request({}, {}))
    with pytest.raises(ValueError, match="less than or equal to 2"):
        request({"scale": 2.5})
    loads = dict(engine.models.loads)
    prepared = engine.prepare(request({}))
    assert prepared.request.ip_adapters[0].image == b""  # the queued request holds the picture, not the upload
    assert prepared.image_prompts[0].size == (64, 64) and engine.models.loads == loads  # nothing loaded


def test_the_shared_queue_carries_the_picture(engine):
    from backends.sdxl_backend.jobs.job import Job
    from backends.sdxl_backend.jobs.redis_queue.codec import prepared_from, submitted

    prepared = engine.prepare(request({"image": base64.b64encode(RED).decode(), "scale": 0.8}))
    fields = submitted(Job("j", prepared), prepared, engine.batch_key(prepared))
    again = prepared_from({key.encode(): value for key, value in fields.items()}, engine)
    assert again.request.ip_adapters == prepared.request.ip_adapters
    assert again.image_prompts[0].tobytes() == prepared.image_prompts[0].tobytes()


def test_the_tiny_ip_adapter_is_stored_with_its_encoder(tiny_ip_adapter):
    stored = Path(tiny_ip_adapter.path)
    assert (stored / IP_ADAPTER_FILE).is_file() and (stored / ENCODER_FOLDER / "config.json").is_file()
    assert tiny_ip_adapter.info.labels["sdxl_kind"] == "ip-adapter"
    assert tiny_ip_adapter.info.labels["fits"] == "8,16,32/32"


def test_import_an_ip_adapter_file_with_its_encoder_and_from_the_hub_cache(tmp_path, cli, tiny_model, tiny_ip_adapter):
    """`--from FILE --encoder DIR`; and the catalog's ip-adapter-sdxl from a hub cache laid out as
    h94/IP-Adapter is, with HF_HUB_OFFLINE=1 (HF_ENDPOINT on a closed port: no network)."""
    stored = Path(tiny_ip_adapter.path)
    assert cli("import", "tiny-sdxl", "--from", tiny_model.path).returncode == 0  # (the session's, copied: quicker)
    without = cli("import", "my-adapter", "--from", str(stored / IP_ADAPTER_FILE), "--fits", "tiny-sdxl")
    assert without.returncode == 1 and "give its image encoder's directory with --encoder" in without.stderr
    imported = cli(
        "import", "my-adapter", "--from", str(stored / IP_ADAPTER_FILE), "--fits", "tiny-sdxl", "--encoder",
        str(stored / ENCODER_FOLDER),
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    row = next(line for line in cli("list").stdout.splitlines() if line.startswith("my-adapter"))
    assert "[IP-Adapter]" in row

    entry = load_catalog()["ip-adapter-sdxl"]
    snapshot, hub = hub_snapshot(tmp_path, entry.repo)
    (snapshot / entry.weights).parent.mkdir(parents=True)
    shutil.copy(stored / IP_ADAPTER_FILE, snapshot / entry.weights)
    shutil.copytree(stored / ENCODER_FOLDER, snapshot / entry.encoder)
    (snapshot / entry.encoder / "pytorch_model.bin").write_bytes(b"not taken")
    imported = cli("import", "ip-adapter-sdxl", **hub)
    assert imported.returncode == 0, imported.stderr
    version = next(p for p in (tmp_path / "bentoml" / "models" / "ip-adapter-sdxl").iterdir() if p.is_dir())
    files = sorted(str(f.relative_to(version)) for f in version.rglob("*") if f.is_file())
    assert files == [
        f"{ENCODER_FOLDER}/config.json",
        f"{ENCODER_FOLDER}/model.safetensors",
        IP_ADAPTER_FILE,
        "model.yaml",
    ]
    assert cli("remove", "ip-adapter-sdxl").returncode == 0


@pytest.mark.served
def test_clients_send_image_prompts_and_the_queue_never_mixes_adapters(side_models_server):
    import webuiapi

    server = side_models_server
    nothing_loaded(server)
    listed = httpx.get(f"{server.url}/v1/ip-adapters", timeout=300).json()["data"]
    assert {"id": ADAPTER, "fits": FITS_TINY_SDXL, "loaded": False}.items() <= listed[0].items()
    square = base64.b64encode(SQUARE).decode()
    # (what webuiapi sends by default: Euler a, 20 steps, CFG 7)
    plain = {"prompt": "a lighthouse", "seed": 5, "width": 64, "height": 64, "scheduler": "euler_a", "steps": 20}
    plain["guidance_scale"] = 7.0
    unit = {"id": ADAPTER, "image": square, "scale": 0.6}
    unprompted, prompted = without_and_with(server, plain, "ip_adapters", unit)
    assert prompted != unprompted
    refused = httpx.post(f"{server.url}/v1/txt2img", json={**plain, "ip_adapters": [{**unit, "id": "x"}]}, timeout=300)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "ip_adapters[0].id"
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    assert [a["id"] for a in status["ip_adapters"]] == [ADAPTER]
    (replica,) = httpx.get(f"{server.url}/v1/system/fleet", timeout=300).json()["replicas"]
    assert replica["devices"][0]["side_models"] == [ADAPTER]  # (what the fleet page lists)

    # The gallery's route takes them too.
    gallery = httpx.post(
        f"{server.url}/v1/generate",
        json={"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 5, "ip_adapters": [unit]},
        timeout=300,
    )
    assert gallery.status_code == 200, gallery.text

    # An OpenAI edit with two images as `image[]` (LibreChat's OpenAIImageTools.js): the second
    # is the image prompt, as the native unit at its default scale.
    room = png_bytes(64, 64, (40, 160, 60))
    form = {"model": "gpt-image-1", "prompt": "a lighthouse", "size": "auto", "seed": "5", "steps": "4"}
    pictures = [("image[]", ("a.png", room, "image/png")), ("image[]", ("b.png", SQUARE, "image/png"))]
    edited = httpx.post(f"{server.url}/v1/images/edits", data=form, files=pictures, timeout=300)
    assert edited.status_code == 200, edited.text
    img2img = {"prompt": "a lighthouse", "image": base64.b64encode(room).decode(), "seed": 5, "steps": 4}
    native, alone = (
        httpx.post(f"{server.url}/v1/img2img", json=body, timeout=300).json()["images"][0]["b64_json"]
        for body in ({**img2img, "ip_adapters": [{"id": ADAPTER, "image": square}]}, img2img)
    )
    as_edited = pixels(base64.b64decode(edited.json()["data"][0]["b64_json"]))
    assert as_edited == pixels(base64.b64decode(native)) != pixels(base64.b64decode(alone))

    # An A1111 client: the ControlNet extension's IP-Adapter unit, on the client's defaults.
    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert ADAPTER in a1111.controlnet_model_list() and "ip-adapter-auto" in a1111.controlnet_module_list()
    answer = a1111.txt2img(
        prompt="a lighthouse",
        seed=5,
        width=64,
        height=64,
        alwayson_scripts={},
        controlnet_units=[
            webuiapi.ControlNetUnit(
                image=Image.open(io.BytesIO(SQUARE)), module="ip-adapter-auto", model=ADAPTER, weight=0.6
            )
        ],
    )
    assert answer.image.convert("RGB").tobytes() == prompted
    assert (
        'ControlNet 0: "Module: ip-adapter-auto, Model: tiny-sdxl-ip-adapter, Weight: 0.6'
        in (answer.image.info["parameters"])
    )

    # Queued behind a long job: a plain job, two with one image prompt (other prompts and
    # seeds), one with another picture, one at another scale. Only the two alike share a call.
    small = {"prompt": "a harbour", "width": 64, "height": 64, "steps": 3, "seed": 2}
    red = base64.b64encode(RED).decode()
    with server.parked():
        blocker = submit(server, LONG)
        wait(server, blocker["id"], until=lambda job: job["status"] == "running")
        queued = [
            submit(server, body)["id"]
            for body in (
                small,
                {**small, "ip_adapters": [unit]},
                {**small, "prompt": "a pier", "seed": 3, "ip_adapters": [unit]},
                {**small, "ip_adapters": [{**unit, "image": red}]},
                {**small, "ip_adapters": [{**unit, "scale": 0.3}]},
            )
        ]
        assert get(server, queued[-1])["status"] == "queued"
        httpx.delete(f"{server.url}/v1/jobs/{blocker['id']}", timeout=300)
    done = [wait(server, job_id)[0] for job_id in queued]
    assert [job["status"] for job in done] == ["succeeded"] * 5
    assert [job["result"]["batch_images"] for job in done] == [1, 2, 2, 1, 1]
    images = [pixels(base64.b64decode(job["result"]["images"][0]["b64_json"])) for job in done]
    assert len(set(images)) == 5
