"""ComfyUI nodes beyond the default graph, through comfy-api-simplified (the real package) and
against the native requests they stand for: the inpainting wirings that keep the image
(SetLatentNoiseMask, InpaintModelConditioning) and the LoRA loaders (LoraLoader,
LoraLoaderModelOnly). The planner's refusals are checked on the planner itself."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from comfy_api_simplified import ComfyApiWrapper
from PIL import Image

from backends.api.comfyui.conditioning import Served
from backends.api.comfyui.graph import Workflow, WorkflowRefused
from backends.api.comfyui.plan import Planner
from backends.sdxl_backend.models.loras import holds_text_encoder_weights
from tests.comfyui_workflows import controlled, inpaint_keeping_the_image, titled, txt2img, with_lora
from tests.conftest import pixels


@pytest.fixture
def server(side_models_server):
    return side_models_server


def one_image(api: ComfyApiWrapper, workflow: dict) -> bytes:
    (data,) = api.queue_and_wait_images(titled(workflow), "Save Image").values()
    return data


def native(server, route: str = "txt2img", **fields) -> bytes:
    body = {"prompt": "a window", "negative_prompt": "blurry", "seed": 5, "width": 64, "height": 64, "steps": 3}
    body |= {"guidance_scale": 7.0, "scheduler": "euler_simple", "prompt_style": "comfyui"}
    answer = httpx.post(f"{server.url}/v1/{route}", json=body | fields, timeout=300)
    assert answer.status_code == 200, answer.text
    return pixels(base64.b64decode(answer.json()["images"][0]["b64_json"]))


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_both_inpainting_wirings_that_keep_the_image_are_the_native_inpaint_from_the_image(server):
    """SetLatentNoiseMask and InpaintModelConditioning (its noise mask on) both start the masked
    area from the image and keep the rest: `masked_content: original`, the mask as it is."""
    api = ComfyApiWrapper(server.url)
    holed = Image.new("RGBA", (64, 64), (30, 120, 200, 255))
    holed.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: what ComfyUI's LoadImage masks
    upload = httpx.post(f"{server.url}/upload/image", files={"image": ("h.png", png(holed))}, timeout=60).json()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = native(
        server,
        "img2img",
        image=base64.b64encode(png(holed)).decode(),
        mask=base64.b64encode(png(mask)).decode(),
        masked_content="original",
        mask_blur=0,
        strength=1.0,
    )
    for wiring in ("SetLatentNoiseMask", "InpaintModelConditioning"):
        made = one_image(api, inpaint_keeping_the_image("a window", upload["name"], wiring))
        assert pixels(made) == inpainted, wiring

    turned_off = inpaint_keeping_the_image("a window", upload["name"], "InpaintModelConditioning")
    turned_off["12"]["inputs"]["noise_mask"] = False
    refused = httpx.post(f"{server.url}/prompt", json={"prompt": turned_off}, timeout=60)
    assert refused.status_code == 400 and "noise_mask" in json.dumps(refused.json()["node_errors"]["12"])


def test_a_lora_on_the_model_alone_is_the_lora_when_it_holds_no_text_encoder_weights(server):
    """tiny-sdxl-lora was trained on the UNet alone (as many SDXL LoRAs are): LoraLoaderModelOnly
    and LoraLoader give the same picture, the native request's with that LoRA."""
    api = ComfyApiWrapper(server.url)
    model_only = one_image(api, with_lora(txt2img("a window"), "tiny-sdxl-lora.safetensors", 0.8, model_only=True))
    both = one_image(api, with_lora(txt2img("a window"), "tiny-sdxl-lora", 0.8, model_only=False))
    plain = one_image(api, txt2img("a window"))
    assert pixels(model_only) == pixels(both) == native(server, loras=[{"id": "tiny-sdxl-lora", "weight": 0.8}])
    assert pixels(model_only) != pixels(plain)


def test_a_union_controlnet_takes_its_type_from_set_union_controlnet_type(server):
    """ComfyUI's SetUnionControlNetType between the loader and the apply node is the unit's
    `control_type`: the same pixels as the native request; "auto" is refused by name."""
    api = ComfyApiWrapper(server.url)
    edges = Image.new("RGB", (64, 64), (0, 0, 0))
    edges.paste((255, 255, 255), (16, 16, 48, 48))
    upload = httpx.post(f"{server.url}/upload/image", files={"image": ("e.png", png(edges))}, timeout=60).json()
    workflow = controlled("a window", "tiny-sdxl-controlnet-union", upload["name"])
    workflow["24"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["20", 0], "type": "depth"}}
    workflow["23"]["inputs"]["control_net"] = ["24", 0]
    unit = {"id": "tiny-sdxl-controlnet-union", "image": base64.b64encode(png(edges)).decode(), "scale": 0.8}
    unit |= {"preprocess": "canny", "low_threshold": 102, "high_threshold": 204, "control_type": "depth"}
    assert pixels(one_image(api, workflow)) == native(server, controlnets=[unit])
    workflow["24"]["inputs"]["type"] = "auto"
    refused = httpx.post(f"{server.url}/prompt", json={"prompt": workflow}, timeout=60)
    assert refused.status_code == 400 and "auto" in json.dumps(refused.json()["node_errors"]["24"])


def test_freeu_and_rescale_cfg_on_the_model_are_the_native_fields(server):
    """FreeU is `freeu`; RescaleCFG is `guidance_rescale`, on a v-prediction model (ComfyUI
    rescales in v-space, where diffusers rescales the model's own prediction: the same there
    alone), and refused by name on a model that predicts noise."""
    api = ComfyApiWrapper(server.url)
    freeu = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}
    workflow = txt2img("a window", model=["12", 0])
    workflow["12"] = {"class_type": "FreeU", "inputs": {"model": ["4", 0], **freeu}}
    made = one_image(api, workflow)
    assert pixels(made) == native(server, freeu=freeu) != pixels(one_image(api, txt2img("a window")))
    rescaled = txt2img("a window", model=["12", 0])
    rescaled["4"]["inputs"]["ckpt_name"] = "tiny-sdxl-vpred.safetensors"
    rescaled["12"] = {"class_type": "RescaleCFG", "inputs": {"model": ["4", 0], "multiplier": 0.5}}
    made = one_image(api, rescaled)
    assert pixels(made) == native(server, model="tiny-sdxl-vpred", guidance_rescale=0.5)
    plain_vpred = txt2img("a window")
    plain_vpred["4"]["inputs"]["ckpt_name"] = "tiny-sdxl-vpred.safetensors"  # (no catalog default rescale)
    assert pixels(one_image(api, plain_vpred)) == native(server, model="tiny-sdxl-vpred", guidance_rescale=0)
    rescaled["4"]["inputs"]["ckpt_name"] = "tiny-sdxl.safetensors"
    refused = httpx.post(f"{server.url}/prompt", json={"prompt": rescaled}, timeout=60)
    assert refused.status_code == 400 and "multiplier" in json.dumps(refused.json()["node_errors"]["12"])


def plan(workflow: dict, lora_changes_clip: bool = False, predicts_v: bool = False):
    served = Served(lambda name: None, lambda _: 4, lambda _: lora_changes_clip, lambda _: predicts_v)
    return Planner(Workflow(workflow, lambda name: None), served).plan()


def test_a_lora_that_changes_the_text_encoders_has_one_weight_on_both():
    """Such a LoRA on the model alone, or with another CLIP strength, is a picture this server
    does not draw (one weight per LoRA): refused by node and input, never run without it."""
    assert plan(with_lora(txt2img("a"), "kohya", 0.5, model_only=True)).request.loras[0].weight == 0.5
    with pytest.raises(WorkflowRefused) as refused:
        plan(with_lora(txt2img("a"), "kohya", 0.5, model_only=True), lora_changes_clip=True)
    assert "lora_name" in json.dumps(refused.value.body["node_errors"]["20"])
    other_clip = with_lora(txt2img("a"), "kohya", 0.5, model_only=False)
    other_clip["20"]["inputs"]["strength_clip"] = 1.0
    assert plan(other_clip).request.loras[0].weight == 0.5  # (no text-encoder weights: strength_clip is moot)
    with pytest.raises(WorkflowRefused) as refused:
        plan(other_clip, lora_changes_clip=True)
    assert "strength_clip" in json.dumps(refused.value.body["node_errors"]["20"])


def test_a_lora_file_says_whether_it_holds_text_encoder_weights(tmp_path):
    """From the tensors' names alone: diffusers' and kohya's names for text-encoder weights."""

    def lora_with(*names: str) -> bool:
        import numpy
        from safetensors.numpy import save_file

        lora_file = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        save_file({name: numpy.zeros(1, dtype=numpy.float32) for name in names}, str(lora_file))
        return holds_text_encoder_weights(lora_file)

    assert not lora_with("unet.down_blocks.0.lora_A.weight")
    assert not lora_with("lora_unet_down_blocks_0.lora_down.weight")
    assert lora_with("unet.a", "text_encoder.text_model.lora_A.weight")
    assert lora_with("lora_unet_a", "lora_te2_text_model_encoder.lora_down.weight")
