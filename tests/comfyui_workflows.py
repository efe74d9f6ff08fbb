"""ComfyUI workflows in API format, as the clients send them: SillyTavern's default (its
`default/content/Default_Comfy_Workflow.json`, placeholders filled as its extension's
`generateComfyImage` fills them), Open WebUI's default (`COMFYUI_DEFAULT_WORKFLOW` in
`backend/open_webui/config.py`, with its node mapping from `utils/images/comfyui.py`), and the
img2img, inpainting and hires-fix wirings of ComfyUI's own examples."""

from __future__ import annotations

import copy
import json
from typing import Any

from comfy_api_simplified import ComfyWorkflowWrapper

SILLYTAVERN_DEFAULT = """{
    "3": {"class_type": "KSampler", "inputs": {"cfg": "%scale%", "denoise": 1, "latent_image": ["5", 0],
          "model": ["4", 0], "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "%sampler%",
          "scheduler": "%scheduler%", "seed": "%seed%", "steps": "%steps%"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "%model%"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": "%height%", "width": "%width%"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "%prompt%"}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "%negative_prompt%"}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "SillyTavern", "images": ["8", 0]}}
}"""


def sillytavern_body(prompt: str, negative: str, seed: int, settings: dict[str, Any]) -> str:
    """The text SillyTavern posts to /prompt: its extension's string replacements of the quoted
    placeholders, then `{"prompt": <workflow>}` as a string (sent without a JSON Content-Type)."""
    workflow = SILLYTAVERN_DEFAULT.replace('"%prompt%"', json.dumps(prompt))
    workflow = workflow.replace('"%negative_prompt%"', json.dumps(negative)).replace('"%seed%"', json.dumps(seed))
    for placeholder in ("model", "vae", "sampler", "scheduler", "steps", "scale", "width", "height", "clip_skip"):
        workflow = workflow.replace(f'"%{placeholder}%"', json.dumps(settings.get(placeholder)))
    return f"""{{
                "prompt": {workflow}
            }}"""


OPEN_WEBUI_DEFAULT: dict[str, Any] = {
    "3": {
        "inputs": {
            "seed": 0,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
        "class_type": "KSampler",
        "_meta": {"title": "KSampler"},
    },
    "4": {
        "inputs": {"ckpt_name": "model.safetensors"},
        "class_type": "CheckpointLoaderSimple",
        "_meta": {"title": "Load Checkpoint"},
    },
    "5": {
        "inputs": {"width": 512, "height": 512, "batch_size": 1},
        "class_type": "EmptyLatentImage",
        "_meta": {"title": "Empty Latent Image"},
    },
    "6": {
        "inputs": {"text": "Prompt", "clip": ["4", 1]},
        "class_type": "CLIPTextEncode",
        "_meta": {"title": "CLIP Text Encode (Prompt)"},
    },
    "7": {"inputs": {"text": "", "clip": ["4", 1]}, "class_type": "CLIPTextEncode", "_meta": {"title": "Negative"}},
    "8": {
        "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
        "class_type": "VAEDecode",
        "_meta": {"title": "VAE Decode"},
    },
    "9": {
        "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
        "class_type": "SaveImage",
        "_meta": {"title": "Save Image"},
    },
}


def open_webui_workflow(model: str, prompt: str, width: int, height: int, n: int, steps: int, seed: int) -> dict:
    """Open WebUI's default workflow with its default node mapping applied (`comfyui_create_image`:
    prompt -> 6.text, model -> 4.ckpt_name, width/height/n -> 5, steps and seed -> 3)."""
    workflow = copy.deepcopy(OPEN_WEBUI_DEFAULT)
    workflow["6"]["inputs"]["text"] = prompt
    workflow["4"]["inputs"]["ckpt_name"] = model
    workflow["5"]["inputs"].update(width=width, height=height, batch_size=n)
    workflow["3"]["inputs"].update(steps=steps, seed=seed)
    return workflow


def txt2img(prompt: str, seed: int = 5, size: int = 64, steps: int = 3, **sampler: Any) -> dict:
    """ComfyUI's default graph (its "Load Default" workflow), API format."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sdxl.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                **sampler,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def img2img(prompt: str, upload: str, denoise: float = 0.6) -> dict:
    """ComfyUI's img2img example: LoadImage -> VAEEncode -> KSampler."""
    workflow = txt2img(prompt, denoise=denoise, latent_image=["10", 0])
    del workflow["5"]
    workflow["11"] = {"class_type": "LoadImage", "inputs": {"image": upload, "upload": "image"}}
    workflow["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["11", 0], "vae": ["4", 2]}}
    return workflow


def inpaint(prompt: str, upload: str) -> dict:
    """ComfyUI's inpainting example: the mask is the upload's transparent area."""
    workflow = txt2img(prompt, latent_image=["10", 0])
    del workflow["5"]
    workflow["11"] = {"class_type": "LoadImage", "inputs": {"image": upload}}
    workflow["10"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["11", 0], "vae": ["4", 2], "mask": ["11", 1], "grow_mask_by": 6},
    }
    return workflow


def inpaint_keeping_the_image(prompt: str, upload: str, wiring: str) -> dict:
    """The two wirings that start the masked area from the image: VAEEncode -> SetLatentNoiseMask,
    and InpaintModelConditioning on the prompts (ComfyUI's inpainting-model example)."""
    workflow = img2img(prompt, upload, denoise=1.0)
    if wiring == "SetLatentNoiseMask":
        workflow["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 1]}}
        workflow["3"]["inputs"]["latent_image"] = ["12", 0]
        return workflow
    del workflow["10"]
    workflow["12"] = {
        "class_type": "InpaintModelConditioning",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["7", 0],
            "vae": ["4", 2],
            "pixels": ["11", 0],
            "mask": ["11", 1],
            "noise_mask": True,
        },
    }
    workflow["3"]["inputs"] |= {"positive": ["12", 0], "negative": ["12", 1], "latent_image": ["12", 2]}
    return workflow


def with_lora(workflow: dict, lora: str, strength: float, model_only: bool) -> dict:
    """A LoRA between the checkpoint and the sampler: LoraLoader on the model and the CLIP, or
    LoraLoaderModelOnly on the model alone."""
    if model_only:
        workflow["20"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["4", 0], "lora_name": lora, "strength_model": strength},
        }
    else:
        workflow["20"] = {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["4", 0],
                "clip": ["4", 1],
                "lora_name": lora,
                "strength_model": strength,
                "strength_clip": strength,
            },
        }
        for encoder in ("6", "7"):
            workflow[encoder]["inputs"]["clip"] = ["20", 1]
    workflow["3"]["inputs"]["model"] = ["20", 0]
    return workflow


def hires_fix(prompt: str, scale: float = 1.5, denoise: float = 0.5) -> dict:
    """ComfyUI's hires-fix example: a second KSampler on the first one's latent, upscaled."""
    workflow = txt2img(prompt)
    workflow["10"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "upscale_method": "bilinear", "scale_by": scale},
    }
    workflow["11"] = {
        "class_type": "KSampler",
        "inputs": {**workflow["3"]["inputs"], "latent_image": ["10", 0], "denoise": denoise, "steps": 4},
    }
    workflow["8"]["inputs"]["samples"] = ["11", 0]
    return workflow


def refined(prompt: str, refiner: str, switch: int = 3, steps: int = 4) -> dict:
    """ComfyUI's SDXL example: the base's KSamplerAdvanced hands its leftover noise to the
    refiner's at step `switch`, the refiner reading the same texts through its own CLIP."""
    workflow = txt2img(prompt, steps=steps)
    base = workflow.pop("3")["inputs"]
    advanced = {"cfg": base["cfg"], "sampler_name": "euler", "scheduler": "normal", "steps": steps}
    workflow["10"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **advanced,
            "add_noise": "enable",
            "noise_seed": base["seed"],
            "start_at_step": 0,
            "end_at_step": switch,
            "return_with_leftover_noise": "enable",
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    }
    workflow["12"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"{refiner}.safetensors"}}
    for node, text, score in (("15", prompt, 6.0), ("16", "blurry", 2.5)):
        workflow[node] = {
            "class_type": "CLIPTextEncodeSDXLRefiner",
            "inputs": {"ascore": score, "width": 64, "height": 64, "text": text, "clip": ["12", 1]},
        }
    workflow["11"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **advanced,
            "add_noise": "disable",
            "noise_seed": 0,
            "start_at_step": switch,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
            "model": ["12", 0],
            "positive": ["15", 0],
            "negative": ["16", 0],
            "latent_image": ["10", 0],
        },
    }
    workflow["8"]["inputs"].update(samples=["11", 0], vae=["12", 2])
    return workflow


def controlled(prompt: str, controlnet: str, upload: str) -> dict:
    """ComfyUI's ControlNet example: Canny edges of an upload, applied to both prompts."""
    workflow = txt2img(prompt, positive=["23", 0], negative=["23", 1])
    workflow["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": f"{controlnet}.safetensors"}}
    workflow["21"] = {"class_type": "LoadImage", "inputs": {"image": upload}}
    workflow["22"] = {
        "class_type": "Canny",
        "inputs": {"image": ["21", 0], "low_threshold": 0.4, "high_threshold": 0.8},
    }
    workflow["23"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["7", 0],
            "control_net": ["20", 0],
            "image": ["22", 0],
            "strength": 0.8,
            "start_percent": 0.0,
            "end_percent": 1.0,
        },
    }
    return workflow


def upscaled(prompt: str, upscaler: str, scale_by: float = 0.5, denoise: float = 0.5) -> dict:
    """ComfyUI's hires fix with an upscale model: the first image through the model, resized
    (Lanczos), encoded again and repainted by a second KSampler."""
    workflow = txt2img(prompt)
    workflow["12"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": f"{upscaler}.safetensors"}}
    workflow["13"] = {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["12", 0], "image": ["8", 0]}}
    workflow["14"] = {
        "class_type": "ImageScaleBy",
        "inputs": {"image": ["13", 0], "upscale_method": "lanczos", "scale_by": scale_by},
    }
    workflow["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["4", 2]}}
    workflow["16"] = {
        "class_type": "KSampler",
        "inputs": {**workflow["3"]["inputs"], "latent_image": ["15", 0], "denoise": denoise, "steps": 4},
    }
    workflow["17"] = {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["4", 2]}}
    workflow["9"]["inputs"]["images"] = ["17", 0]
    return workflow


def titled(workflow: dict) -> ComfyWorkflowWrapper:
    """A workflow as comfy-api-simplified takes it: each node with its `_meta` title, as
    ComfyUI's "Export (API)" writes them (the wrapper finds the output node by its title)."""
    for node in workflow.values():
        node["_meta"] = {"title": {"SaveImage": "Save Image"}.get(node["class_type"], node["class_type"])}
    return ComfyWorkflowWrapper(workflow)
