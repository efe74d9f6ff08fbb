"""The ComfyUI dialect, through the calls its clients make: SillyTavern's `comfy` source
(`src/endpoints/stable-diffusion.js`: /object_info for its lists, /prompt, /history polled,
/view), Open WebUI's ComfyUI engine (`backend/open_webui/utils/images/comfyui.py`: /ws, /prompt
with its client id, /history/{id}, /view), and the real packages comfy-api-simplified (PyPI) and
@saintno/comfyui-sdk (npm, tests/test_comfyui_sdk.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid

import httpx
import pytest
import websockets
from comfy_api_simplified import ComfyApiWrapper
from PIL import Image

from tests.comfyui_workflows import (
    hires_fix,
    img2img,
    inpaint,
    open_webui_workflow,
    sillytavern_body,
    titled,
    txt2img,
)
from tests.conftest import GUARD_KEYS, pixels
from tests.polling import poll


@pytest.fixture
def server(side_models_server):
    return side_models_server


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_sillytaverns_lists_and_default_workflow_give_an_image(server):
    """SillyTavern reads its lists from /object_info unguarded, then posts its default workflow
    as text (no JSON Content-Type), polls /history every 100 ms and fetches the first image."""
    assert httpx.get(f"{server.url}/system_stats", timeout=60).status_code == 200  # its "ping"
    info = httpx.get(f"{server.url}/object_info", timeout=60).json()
    samplers, schedulers = info["KSampler"]["input"]["required"]["sampler_name"][0], None
    schedulers = info["KSampler"]["input"]["required"]["scheduler"][0]
    models = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "euler" in samplers and "normal" in schedulers and "tiny-sdxl.safetensors" in models
    assert info["VAELoader"]["input"]["required"]["vae_name"][0] == ["tiny-sdxl-vae", "tiny-sdxl-vae.safetensors"]
    assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == []  # read unguarded: present, empty
    settings = {"model": "tiny-sdxl.safetensors", "sampler": "euler", "scheduler": "normal", "steps": 3}
    settings |= {"scale": 7, "width": 64, "height": 96}
    body = sillytavern_body("a lighthouse", "blurry", 2**52 + 5, settings)  # (its seeds reach 2**53)
    queued = httpx.post(f"{server.url}/prompt", content=body, headers={"Content-Type": "text/plain"}, timeout=300)
    assert queued.status_code == 200, queued.text
    prompt_id = queued.json()["prompt_id"]
    item = poll(lambda: httpx.get(f"{server.url}/history", timeout=60).json().get(prompt_id), every=0.1)
    assert item["status"]["status_str"] == "success" and item["status"]["completed"]
    first = next(image for output in item["outputs"].values() for image in output["images"])
    view = httpx.get(
        f"{server.url}/view?filename={first['filename']}&subfolder={first['subfolder']}&type={first['type']}",
        timeout=60,
    )
    assert view.status_code == 200 and size_of(view.content) == (64, 96)


def test_open_webuis_default_workflow_over_its_socket_and_history(server):
    """Open WebUI: a socket with its client id, /prompt with the same id, wait for `executing`
    with no node for its prompt, then /history/{id} and /view; with Bearer and an empty key
    (it sends one when none is set)."""
    headers = {"Authorization": "Bearer"}  # ("Bearer " with its empty key: HTTP parsing drops the space)
    client_id = str(uuid.uuid4())
    workflow = open_webui_workflow("tiny-sdxl.safetensors", "a red boat", 64, 64, 2, 3, 11)

    async def run() -> tuple[str, list[dict]]:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as socket:
            async with httpx.AsyncClient(timeout=300) as http:
                queued = await http.post(
                    f"{server.url}/prompt", json={"prompt": workflow, "client_id": client_id}, headers=headers
                )
            assert queued.status_code == 200, queued.text
            prompt_id, seen = queued.json()["prompt_id"], []
            while True:
                message = await asyncio.wait_for(socket.recv(), 300)
                if isinstance(message, str):
                    event = json.loads(message)
                    seen.append(event)
                    data = event["data"]
                    if event["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                        return prompt_id, seen

    prompt_id, seen = asyncio.run(run())
    kinds = [event["type"] for event in seen]
    assert kinds[0] == "status" and seen[0]["data"]["sid"] == client_id
    for kind in ("execution_start", "execution_cached", "progress", "executed", "execution_success"):
        assert kind in kinds, kinds
    assert kinds.index("execution_start") < kinds.index("progress") < kinds.index("executed")
    progress = [event["data"] for event in seen if event["type"] == "progress"]
    assert progress[-1]["max"] == 3 and progress[-1]["node"] == "3"
    history = httpx.get(f"{server.url}/history/{prompt_id}", headers=headers, timeout=60).json()
    images = history[prompt_id]["outputs"]["9"]["images"]
    assert len(images) == 2
    for image in images:
        view = httpx.get(f"{server.url}/view", params=image, headers=headers, timeout=60)
        assert size_of(view.content) == (64, 64)


def test_a_workflow_and_the_same_native_request_give_the_same_pixels(server):
    """euler with ComfyUI's "normal" schedule is the scheduler `euler_simple` here; the prompts
    are read by ComfyUI's rule, which a native request asks for with `prompt_style`."""
    api = ComfyApiWrapper(server.url)
    for prompt in ("a lighthouse", "a (lighthouse:1.3) [at] ((dusk))"):
        images = api.queue_and_wait_images(titled(txt2img(prompt, seed=21)), "Save Image")
        native = httpx.post(
            f"{server.url}/v1/txt2img",
            json={
                "prompt": prompt,
                "negative_prompt": "blurry",
                "seed": 21,
                "width": 64,
                "height": 64,
                "steps": 3,
                "guidance_scale": 7.0,
                "scheduler": "euler_simple",
                "clip_skip": 2,
                "prompt_style": "comfyui",
            },
            timeout=300,
        ).json()
        assert pixels(next(iter(images.values()))) == pixels(base64.b64decode(native["images"][0]["b64_json"]))


def test_comfy_api_simplified_runs_img2img_inpainting_and_the_hires_fix(server, tmp_path):
    api = ComfyApiWrapper(server.url)
    picture = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(picture)
    uploaded = api.upload_image(picture)
    assert uploaded["type"] == "input" and uploaded["name"] != "in.png"  # (the server names it)
    made = api.queue_and_wait_images(titled(img2img("an oil painting", uploaded["name"])), "Save Image")
    assert [size_of(data) for data in made.values()] == [(96, 64)]

    holed = Image.new("RGBA", (64, 64), (30, 120, 200, 255))
    holed.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: what ComfyUI's LoadImage masks
    hole = tmp_path / "hole.png"
    holed.save(hole)
    with_hole = api.upload_image(hole)["name"]
    made = api.queue_and_wait_images(titled(inpaint("a window", with_hole)), "Save Image")
    result = Image.open(io.BytesIO(next(iter(made.values())))).convert("RGB")
    assert result.size == (64, 64) and result.getpixel((2, 2)) == (30, 120, 200)  # outside the mask: kept

    made = api.queue_and_wait_images(titled(hires_fix("a castle", scale=1.5)), "Save Image")
    assert [size_of(data) for data in made.values()] == [(96, 96)]
    native = {"prompt": "a castle", "negative_prompt": "blurry", "seed": 5, "width": 64, "height": 64, "steps": 3}
    native |= {"guidance_scale": 7.0, "scheduler": "euler_simple", "prompt_style": "comfyui"}
    native["hires_fix"] = {"scale": 1.5, "upscaler": "latent", "strength": 0.5, "steps": 4}
    answer = httpx.post(f"{server.url}/v1/txt2img", json=native, timeout=300).json()
    assert pixels(next(iter(made.values()))) == pixels(base64.b64decode(answer["images"][0]["b64_json"]))


def test_the_interrupt_stops_a_parked_prompt_and_its_socket_says_so(server):
    api = ComfyApiWrapper(server.url)
    with server.parked():
        prompt_id = api.queue_prompt(txt2img("park here", steps=6), "watcher")["prompt_id"]
        poll(lambda: api.get_queue()["queue_running"], lambda running: running and running[0][1] == prompt_id)
        api.interrupt()
        history = poll(lambda: api.get_history(prompt_id), lambda entry: prompt_id in entry)
    status = history[prompt_id]["status"]
    assert status["status_str"] == "error" and not status["completed"]
    assert "execution_interrupted" in [message[0] for message in status["messages"]]
    assert httpx.get(f"{server.url}/v1/jobs/{prompt_id}", timeout=60).json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("change", "node", "error_type", "words"),
    [
        (
            lambda w: w.update({"12": {"class_type": "FluxGuidance", "inputs": {}}}),
            None,
            "missing_node_type",
            "FluxGuidance",
        ),
        (lambda w: w["3"]["inputs"].update(cfg_scale=5), "3", "unknown_input", "cfg_scale"),
        (lambda w: w["8"]["inputs"].update(samples=["30", 0]), "8", "missing_link", "'30'"),
        (lambda w: w["6"]["inputs"].update(clip=["8", 0]), "6", "return_type_mismatch", "IMAGE"),
        (
            lambda w: (
                w["3"]["inputs"].update(latent_image=["10", 0])
                or w.update(
                    {
                        "10": {
                            "class_type": "LatentUpscaleBy",
                            "inputs": {"samples": ["3", 0], "upscale_method": "bilinear", "scale_by": 2},
                        }
                    }
                )
            ),
            "10",
            "dependency_cycle",
            "cycle",
        ),
        (lambda w: w["3"]["inputs"].update(steps=0), "3", "value_smaller_than_min", "steps"),
        (lambda w: w["4"]["inputs"].update(ckpt_name="flux1-dev.safetensors"), "4", "value_not_in_list", "flux1-dev"),
        (
            lambda w: w["3"]["inputs"].update(scheduler="karras", sampler_name="ddim"),
            "3",
            "not_runnable_here",
            "ddim_uniform",
        ),
        (lambda w: w["6"]["inputs"].update(text="(a lighthouse:20)"), "6", "value_not_valid_here", "weight"),
        (lambda w: w["5"]["inputs"].update(width=60), "5", "value_not_valid_here", "width"),
        (lambda w: w["3"]["inputs"].pop("negative"), "3", "required_input_missing", "negative"),
    ],
)
def test_a_workflow_that_cannot_run_gets_comfyuis_400_naming_the_node_and_input(
    server, change, node, error_type, words
):
    workflow = txt2img("a lighthouse")
    change(workflow)
    refused = httpx.post(f"{server.url}/api/prompt", json={"prompt": workflow}, timeout=60)
    assert refused.status_code == 400, refused.text
    body = refused.json()
    if node is None:
        assert body["error"]["type"] == error_type and words in body["error"]["message"]
        return
    (error,) = body["node_errors"][node]["errors"]
    assert error["type"] == error_type and words in error["message"] + json.dumps(error["extra_info"]), error


def test_listings_clients_read(server):
    for prefix in ("", "/api"):
        models = httpx.get(f"{server.url}{prefix}/models/checkpoints", timeout=60).json()
        assert "tiny-sdxl.safetensors" in models
    assert httpx.get(f"{server.url}/models/nothing", timeout=60).status_code == 404
    assert httpx.get(f"{server.url}/object_info/KSampler", timeout=60).json()["KSampler"]["output"] == ["LATENT"]
    assert httpx.get(f"{server.url}/object_info/FluxGuidance", timeout=60).json() == {}
    assert isinstance(httpx.get(f"{server.url}/embeddings", timeout=60).json(), list)
    stats = httpx.get(f"{server.url}/system_stats", timeout=60).json()
    assert stats["system"]["os"] in ("posix", "nt") and stats["devices"][0]["type"] == "cpu"
    assert httpx.get(f"{server.url}/history/{'0' * 32}", timeout=60).json() == {}
    assert (
        httpx.post(f"{server.url}/upload/image", files={"image": ("x.eps", b"%!PS-Adobe", "image/eps")}).status_code
        == 400
    )
    assert httpx.get(f"{server.url}/prompt", timeout=60).json() == {"exec_info": {"queue_remaining": 0}}


def test_with_api_keys_the_socket_takes_the_key_as_a_header_or_token_and_checks_the_origin(guarded):
    """A WebSocket is not covered by CORS: the edge checks its origin and key itself. A browser
    cannot send headers on a socket, so `?token=` carries the key there."""
    key, other = GUARD_KEYS[0], GUARD_KEYS[1]
    base = f"ws://127.0.0.1:{guarded.port}/ws?clientId=c1"

    async def opens(url: str, **options) -> bool:
        try:
            async with websockets.connect(url, **options) as socket:
                return json.loads(await asyncio.wait_for(socket.recv(), 60))["type"] == "status"
        except websockets.exceptions.InvalidStatus:
            return False

    async def opens_once_free(url: str, **options) -> bool:
        """`guarded` allows one stream per key: the last socket's slot is free once the server
        has seen it close, which may come after the next one knocks."""
        for _ in range(150):
            if await opens(url, **options):
                return True
            await asyncio.sleep(0.2)
        return False

    async def check() -> None:
        # (the refusals first, while no socket holds the key's one slot: each is the guard's own)
        assert not await opens(base)
        assert not await opens(f"{base}&token=wrong")
        assert not await opens(f"{base}&token={key}", origin="http://evil.example")
        assert await opens_once_free(f"{base}&token={key}")
        assert await opens_once_free(base, additional_headers={"Authorization": f"Bearer {key}"})
        assert await opens_once_free(f"{base}&token={key}", origin="http://gallery.local")  # (SDXL_CORS_ORIGINS)

    asyncio.run(check())
    basic = httpx.BasicAuth("comfy", key)  # (comfy-api-simplified's user and password)
    queued = httpx.post(
        f"{guarded.url}/prompt", json={"prompt": txt2img("a key's lighthouse")}, auth=basic, timeout=300
    )
    assert queued.status_code == 200, queued.text
    prompt_id = queued.json()["prompt_id"]
    entry = poll(lambda: httpx.get(f"{guarded.url}/history/{prompt_id}", auth=basic, timeout=60).json(), every=0.2)
    image = entry[prompt_id]["outputs"]["9"]["images"][0]
    assert httpx.get(f"{guarded.url}/view", params=image, auth=basic, timeout=60).status_code == 200
    others = httpx.BasicAuth("comfy", other)
    assert httpx.get(f"{guarded.url}/history/{prompt_id}", auth=others, timeout=60).json() == {}
    assert prompt_id not in httpx.get(f"{guarded.url}/history", auth=others, timeout=60).json()
    assert httpx.get(f"{guarded.url}/view", params=image, auth=others, timeout=60).status_code == 404
    assert httpx.get(f"{guarded.url}/history", timeout=60).status_code == 401


def test_the_vae_loader_a_repeated_batch_the_sdxl_encoder_and_preview_frames(server):
    """VAELoader names the served VAE (the one every model decodes with here, so the pixels are
    the checkpoint VAE's); RepeatLatentBatch makes more images; CLIPTextEncodeSDXL with one
    text and the output's sizes is CLIPTextEncode; `extra_data.preview_method` asks for
    ComfyUI's binary preview frames."""
    api = ComfyApiWrapper(server.url)

    def run(workflow: dict) -> list[bytes]:
        return list(api.queue_and_wait_images(titled(workflow), "Save Image").values())

    plain = run(txt2img("a lighthouse", seed=4))
    with_loader = txt2img("a lighthouse", seed=4)
    with_loader["12"] = {"class_type": "VAELoader", "inputs": {"vae_name": "tiny-sdxl-vae.safetensors"}}
    with_loader["8"]["inputs"]["vae"] = ["12", 0]
    assert [pixels(image) for image in run(with_loader)] == [pixels(image) for image in plain]

    repeated = txt2img("a lighthouse", seed=4, latent_image=["12", 0])
    repeated["12"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 3}}
    images = run(repeated)
    assert len({pixels(image) for image in images}) == 3  # (image i: seed + i; a batch is its own computation)

    sdxl = txt2img("a lighthouse", seed=4)
    sizes = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
    for node, text in (("6", "a lighthouse"), ("7", "blurry")):
        sdxl[node] = {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {"clip": ["4", 1], "text_g": text, "text_l": text, **sizes},
        }
    assert [pixels(image) for image in run(sdxl)] == [pixels(image) for image in plain]
    sdxl["6"]["inputs"]["target_width"] = 1024
    refused = httpx.post(f"{server.url}/prompt", json={"prompt": sdxl}, timeout=60)
    assert (
        refused.status_code == 400
        and refused.json()["node_errors"]["6"]["errors"][0]["extra_info"]["input_name"] == "target_width"
    )

    async def previews() -> list[bytes]:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws?clientId=previewer") as socket:
            body = {
                "prompt": txt2img("a lighthouse", steps=4),
                "client_id": "previewer",
                "extra_data": {"preview_method": "auto"},
            }
            async with httpx.AsyncClient(timeout=60) as http:
                prompt_id = (await http.post(f"{server.url}/prompt", json=body)).json()["prompt_id"]
            frames = []
            while True:
                message = await asyncio.wait_for(socket.recv(), 300)
                if isinstance(message, bytes):
                    frames.append(message)
                elif json.loads(message)["type"] == "executing" and json.loads(message)["data"] == {
                    "node": None,
                    "display_node": None,
                    "prompt_id": prompt_id,
                }:
                    return frames

    frames = asyncio.run(previews())
    assert frames and all(frame[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02" for frame in frames)
    assert Image.open(io.BytesIO(frames[0][8:])).format == "PNG"


def test_the_refiner_hand_off_a_controlnet_and_an_upscalers_hires_fix_give_the_native_requests_pixels(server):
    """ComfyUI's SDXL refiner example (two KSamplerAdvanced) is `refiner.switch_at` E / steps;
    its ControlNet example (Canny of an upload, ControlNetApplyAdvanced) a ControlNet unit; its
    hires fix with an upscale model (one pass, Lanczos) the hires fix with that upscaler."""
    from tests.comfyui_workflows import controlled, refined, upscaled

    api = ComfyApiWrapper(server.url)

    def native(**fields) -> bytes:
        body = {"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 5, "width": 64, "height": 64}
        body |= {"steps": 4, "guidance_scale": 7.0, "scheduler": "euler_simple", "prompt_style": "comfyui"}
        answer = httpx.post(f"{server.url}/v1/txt2img", json={**body, **fields}, timeout=300)
        assert answer.status_code == 200, answer.text
        return pixels(base64.b64decode(answer.json()["images"][0]["b64_json"]))

    made = api.queue_and_wait_images(titled(refined("a lighthouse", "tiny-sdxl-refiner")), "Save Image")
    assert pixels(next(iter(made.values()))) == native(refiner={"model": "tiny-sdxl-refiner", "switch_at": 0.75})

    edges = io.BytesIO()
    square = Image.new("RGB", (64, 64), (0, 0, 0))
    square.paste((255, 255, 255), (16, 16, 48, 48))
    square.save(edges, format="PNG")
    upload = httpx.post(f"{server.url}/upload/image", files={"image": ("e.png", edges.getvalue())}, timeout=60).json()
    made = api.queue_and_wait_images(
        titled(controlled("a lighthouse", "tiny-sdxl-controlnet", upload["name"])), "Save Image"
    )
    unit = {"id": "tiny-sdxl-controlnet", "image": base64.b64encode(edges.getvalue()).decode(), "scale": 0.8}
    unit |= {"preprocess": "canny", "low_threshold": 102, "high_threshold": 204}
    assert pixels(next(iter(made.values()))) == native(steps=3, controlnets=[unit])

    made = api.queue_and_wait_images(titled(upscaled("a lighthouse", "tiny-upscaler", scale_by=0.5)), "Save Image")
    hires = {"upscaler": "tiny-upscaler", "scale": 2.0, "strength": 0.5, "steps": 4}
    assert pixels(next(iter(made.values()))) == native(steps=3, hires_fix=hires)
    too_far = upscaled("a lighthouse", "tiny-upscaler", scale_by=1.5)
    refused = httpx.post(f"{server.url}/prompt", json={"prompt": too_far}, timeout=60)
    assert refused.status_code == 400 and "14" in refused.json()["node_errors"], refused.text


def test_the_pag_node_is_pag_scale_and_the_openai_extra_field_takes_it_too(server):
    """ComfyUI's PerturbedAttentionGuidance on the model is `pag_scale`; the PNG says so."""
    import openai

    api = ComfyApiWrapper(server.url)
    workflow = txt2img("a lighthouse", seed=8, model=["12", 0])
    workflow["12"] = {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["4", 0], "scale": 3.0}}
    (guided,) = api.queue_and_wait_images(titled(workflow), "Save Image").values()
    (plain,) = api.queue_and_wait_images(titled(txt2img("a lighthouse", seed=8)), "Save Image").values()
    assert pixels(guided) != pixels(plain) and "PAG Scale: 3.0" in Image.open(io.BytesIO(guided)).info["parameters"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    body = {"prompt": "a lighthouse", "negative_prompt": "blurry", "seed": 8, "width": 64, "height": 64, "steps": 3}
    body |= {"guidance_scale": 7.0, "scheduler": "euler_simple", "prompt_style": "comfyui", "pag_scale": 3.0}
    made = client.images.generate(model="tiny-sdxl", prompt="a lighthouse", extra_body=body)
    assert pixels(base64.b64decode(made.data[0].b64_json)) == pixels(guided)
