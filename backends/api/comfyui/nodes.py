"""The ComfyUI nodes this server runs, as ComfyUI describes them (`/object_info`) and checks a
workflow's values against them: each input's type, default and range, each node's outputs.

A node's lists (checkpoints, LoRAs, samplers...) are this server's: the served models under
their ids and as file names (`tiny-sdxl.safetensors`), ComfyUI's sampler and scheduler names
for which a scheduler here is the same solver on the same noise schedule. The loaders clients
read unguarded (`UNETLoader`, `VAELoader`, `UpscaleModelLoader`...) are listed too, with what
is served (an empty list where nothing is), so a client that reads them never meets a missing
key; running a workflow that uses one is refused by name (workflow.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backends.sdxl_backend.units import UNION_CONTROL_TYPES

MAX_RESOLUTION = 16384  # ComfyUI's own bound on a size widget (the server's limits apply after)
MAX_SEED = 2**64 - 1  # ComfyUI's seeds are 64-bit; the pipeline's are 32-bit (taken modulo 2**32)
LINK_TYPES = ("MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "UPSCALE_MODEL", "CONTROL_NET")

# ComfyUI's (sampler, scheduler) pairs that a scheduler here runs as the same solver on the same
# noise levels: "normal" is timesteps spaced evenly from the first to the last (diffusers'
# "linspace"), "simple" and "sgm_uniform" evenly from the first (diffusers' "trailing").
# The "_gpu" samplers are ComfyUI's same solvers drawing their noise on the device.
PAIRS: dict[tuple[str, str], str] = {
    ("euler", "normal"): "euler_simple",
    ("euler", "simple"): "euler_sgm_uniform",
    ("euler", "sgm_uniform"): "euler_sgm_uniform",
    ("euler", "karras"): "euler_karras",
    ("dpmpp_2m", "karras"): "dpmpp_2m_karras",
    ("dpmpp_2m", "exponential"): "dpmpp_2m_exponential",
    ("dpmpp_2m", "beta"): "dpmpp_2m_beta",
    ("dpmpp_2m_sde", "karras"): "dpmpp_2m_sde_karras",
    ("dpmpp_2m_sde_gpu", "karras"): "dpmpp_2m_sde_karras",
    ("dpmpp_sde", "karras"): "dpmpp_sde_karras",
    ("dpmpp_sde_gpu", "karras"): "dpmpp_sde_karras",
    ("dpmpp_3m_sde", "karras"): "dpmpp_3m_sde_karras",
    ("dpmpp_3m_sde_gpu", "karras"): "dpmpp_3m_sde_karras",
    ("ddim", "ddim_uniform"): "ddim",
    ("lcm", "sgm_uniform"): "lcm",
}
SAMPLERS = list(dict.fromkeys(sampler for sampler, _ in PAIRS))
SCHEDULERS = list(dict.fromkeys(scheduler for _, scheduler in PAIRS))


@dataclass(frozen=True)
class Input:
    """One input of a node: a link of `kind` (MODEL, CLIP, ...), a widget value (INT, FLOAT,
    STRING, BOOLEAN), or a choice among `choices` (a COMBO; the list named by `choices` is read
    from the server when the catalog is built)."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    choices: str | list[str] | None = None

    @property
    def is_link(self) -> bool:
        return self.kind in LINK_TYPES


@dataclass(frozen=True)
class Node:
    display_name: str
    category: str
    inputs: dict[str, Input]
    outputs: tuple[str, ...] = ()
    output_node: bool = False
    optional: tuple[str, ...] = ()  # inputs a workflow may send or leave out ("upload": the editor's button)
    runs: bool = True  # False: listed for clients that read it, refused in a workflow


def _int(default: int, minimum: int, maximum: int, step: int = 1) -> Input:
    return Input("INT", {"default": default, "min": minimum, "max": maximum, "step": step})


def _float(default: float, minimum: float, maximum: float, step: float = 0.01) -> Input:
    return Input("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": step})


def _size(default: int) -> Input:
    return _int(default, 16, MAX_RESOLUTION, 8)


LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
IMAGE_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]

NODES: dict[str, Node] = {
    "CheckpointLoaderSimple": Node(
        "Load Checkpoint", "loaders", {"ckpt_name": Input("COMBO", choices="checkpoints")}, ("MODEL", "CLIP", "VAE")
    ),
    "CLIPTextEncode": Node(
        "CLIP Text Encode (Prompt)",
        "conditioning",
        {"text": Input("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": Input("CLIP")},
        ("CONDITIONING",),
    ),
    "CLIPSetLastLayer": Node(
        "CLIP Set Last Layer",
        "conditioning",
        {"clip": Input("CLIP"), "stop_at_clip_layer": _int(-1, -24, -1)},
        ("CLIP",),
    ),
    "EmptyLatentImage": Node(
        "Empty Latent Image",
        "latent",
        {"width": _size(512), "height": _size(512), "batch_size": _int(1, 1, 4096)},
        ("LATENT",),
    ),
    "KSampler": Node(
        "KSampler",
        "sampling",
        {
            "model": Input("MODEL"),
            "seed": _int(0, 0, MAX_SEED),
            "steps": _int(20, 1, 10000),
            "cfg": _float(8.0, 0.0, 100.0, 0.1),
            "sampler_name": Input("COMBO", choices=SAMPLERS),
            "scheduler": Input("COMBO", choices=SCHEDULERS),
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "latent_image": Input("LATENT"),
            "denoise": _float(1.0, 0.0, 1.0),
        },
        ("LATENT",),
    ),
    "CLIPTextEncodeSDXL": Node(
        "CLIP Text Encode (SDXL)",
        "advanced/conditioning",
        {
            "clip": Input("CLIP"),
            "width": _int(1024, 0, MAX_RESOLUTION),
            "height": _int(1024, 0, MAX_RESOLUTION),
            "crop_w": _int(0, 0, MAX_RESOLUTION),
            "crop_h": _int(0, 0, MAX_RESOLUTION),
            "target_width": _int(1024, 0, MAX_RESOLUTION),
            "target_height": _int(1024, 0, MAX_RESOLUTION),
            "text_g": Input("STRING", {"multiline": True, "dynamicPrompts": True}),
            "text_l": Input("STRING", {"multiline": True, "dynamicPrompts": True}),
        },
        ("CONDITIONING",),
    ),
    "RepeatLatentBatch": Node(
        "Repeat Latent Batch", "latent/batch", {"samples": Input("LATENT"), "amount": _int(1, 1, 64)}, ("LATENT",)
    ),
    "KSamplerAdvanced": Node(
        "KSampler (Advanced)",
        "sampling",
        {
            "model": Input("MODEL"),
            "add_noise": Input("COMBO", choices=["enable", "disable"]),
            "noise_seed": _int(0, 0, MAX_SEED),
            "steps": _int(20, 1, 10000),
            "cfg": _float(8.0, 0.0, 100.0, 0.1),
            "sampler_name": Input("COMBO", choices=SAMPLERS),
            "scheduler": Input("COMBO", choices=SCHEDULERS),
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "latent_image": Input("LATENT"),
            "start_at_step": _int(0, 0, 10000),
            "end_at_step": _int(10000, 0, 10000),
            "return_with_leftover_noise": Input("COMBO", choices=["disable", "enable"]),
        },
        ("LATENT",),
    ),
    "CLIPTextEncodeSDXLRefiner": Node(
        "CLIP Text Encode (SDXL Refiner)",
        "advanced/conditioning",
        {
            "ascore": _float(6.0, 0.0, 1000.0),
            "width": _int(1024, 0, MAX_RESOLUTION),
            "height": _int(1024, 0, MAX_RESOLUTION),
            "text": Input("STRING", {"multiline": True, "dynamicPrompts": True}),
            "clip": Input("CLIP"),
        },
        ("CONDITIONING",),
    ),
    "ControlNetLoader": Node(
        "Load ControlNet Model",
        "loaders",
        {"control_net_name": Input("COMBO", choices="controlnet")},
        ("CONTROL_NET",),
    ),
    "SetUnionControlNetType": Node(
        "SetUnionControlNetType",
        "conditioning/controlnet",
        {"control_net": Input("CONTROL_NET"), "type": Input("COMBO", choices=["auto", *UNION_CONTROL_TYPES])},
        ("CONTROL_NET",),
    ),
    "ControlNetApplyAdvanced": Node(
        "Apply ControlNet",
        "conditioning/controlnet",
        {
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "control_net": Input("CONTROL_NET"),
            "image": Input("IMAGE"),
            "strength": _float(1.0, 0.0, 10.0),
            "start_percent": _float(0.0, 0.0, 1.0, 0.001),
            "end_percent": _float(1.0, 0.0, 1.0, 0.001),
            "vae": Input("VAE"),
        },
        ("CONDITIONING", "CONDITIONING"),
        optional=("vae",),
    ),
    "Canny": Node(
        "Canny",
        "image/preprocessors",
        {
            "image": Input("IMAGE"),
            "low_threshold": _float(0.4, 0.01, 0.99),
            "high_threshold": _float(0.8, 0.01, 0.99),
        },
        ("IMAGE",),
    ),
    "VAEDecode": Node("VAE Decode", "latent", {"samples": Input("LATENT"), "vae": Input("VAE")}, ("IMAGE",)),
    "VAEEncode": Node("VAE Encode", "latent", {"pixels": Input("IMAGE"), "vae": Input("VAE")}, ("LATENT",)),
    "VAEEncodeForInpaint": Node(
        "VAE Encode (for Inpainting)",
        "latent/inpaint",
        {"pixels": Input("IMAGE"), "vae": Input("VAE"), "mask": Input("MASK"), "grow_mask_by": _int(6, 0, 64)},
        ("LATENT",),
    ),
    "InpaintModelConditioning": Node(
        "InpaintModelConditioning",
        "conditioning/inpaint",
        {
            "positive": Input("CONDITIONING"),
            "negative": Input("CONDITIONING"),
            "vae": Input("VAE"),
            "pixels": Input("IMAGE"),
            "mask": Input("MASK"),
            "noise_mask": Input("BOOLEAN", {"default": True}),
        },
        ("CONDITIONING", "CONDITIONING", "LATENT"),
        optional=("noise_mask",),  # (added in 2024: older workflows leave it out)
    ),
    "SetLatentNoiseMask": Node(
        "Set Latent Noise Mask", "latent/inpaint", {"samples": Input("LATENT"), "mask": Input("MASK")}, ("LATENT",)
    ),
    "LatentUpscale": Node(
        "Upscale Latent",
        "latent",
        {
            "samples": Input("LATENT"),
            "upscale_method": Input("COMBO", choices=LATENT_UPSCALE_METHODS),
            "width": _int(512, 0, MAX_RESOLUTION, 8),
            "height": _int(512, 0, MAX_RESOLUTION, 8),
            "crop": Input("COMBO", choices=["disabled", "center"]),
        },
        ("LATENT",),
    ),
    "LatentUpscaleBy": Node(
        "Upscale Latent By",
        "latent",
        {
            "samples": Input("LATENT"),
            "upscale_method": Input("COMBO", choices=LATENT_UPSCALE_METHODS),
            "scale_by": _float(1.5, 0.01, 8.0),
        },
        ("LATENT",),
    ),
    "PerturbedAttentionGuidance": Node(
        "PerturbedAttentionGuidance",
        "model_patches/unet",
        {"model": Input("MODEL"), "scale": _float(3.0, 0.0, 100.0)},
        ("MODEL",),
    ),
    "RescaleCFG": Node(
        "RescaleCFG", "advanced/model", {"model": Input("MODEL"), "multiplier": _float(0.7, 0.0, 1.0)}, ("MODEL",)
    ),
    "FreeU": Node(
        "FreeU",
        "model_patches/unet",
        {
            "model": Input("MODEL"),
            "b1": _float(1.1, 0.0, 10.0),
            "b2": _float(1.2, 0.0, 10.0),
            "s1": _float(0.9, 0.0, 10.0),
            "s2": _float(0.2, 0.0, 10.0),
        },
        ("MODEL",),
    ),
    "LoraLoader": Node(
        "Load LoRA",
        "loaders",
        {
            "model": Input("MODEL"),
            "clip": Input("CLIP"),
            "lora_name": Input("COMBO", choices="loras"),
            "strength_model": _float(1.0, -100.0, 100.0),
            "strength_clip": _float(1.0, -100.0, 100.0),
        },
        ("MODEL", "CLIP"),
    ),
    "LoraLoaderModelOnly": Node(
        "LoraLoaderModelOnly",
        "loaders",
        {
            "model": Input("MODEL"),
            "lora_name": Input("COMBO", choices="loras"),
            "strength_model": _float(1.0, -100.0, 100.0),
        },
        ("MODEL",),
    ),
    "LoadImage": Node(
        "Load Image",
        "image",
        {"image": Input("COMBO", {"image_upload": True}, choices="uploads")},
        ("IMAGE", "MASK"),
        optional=("upload",),
    ),
    "LoadImageMask": Node(
        "Load Image (as Mask)",
        "mask",
        {
            "image": Input("COMBO", {"image_upload": True}, choices="uploads"),
            "channel": Input("COMBO", choices=["alpha", "red", "green", "blue"]),
        },
        ("MASK",),
        optional=("upload",),
    ),
    "SaveImage": Node(
        "Save Image",
        "image",
        {"images": Input("IMAGE"), "filename_prefix": Input("STRING", {"default": "ComfyUI"})},
        output_node=True,
    ),
    "PreviewImage": Node("Preview Image", "image", {"images": Input("IMAGE")}, output_node=True),
    # Read by clients for their model lists; a workflow that uses one is refused (plan.py).
    "UNETLoader": Node(
        "Load Diffusion Model",
        "advanced/loaders",
        {
            "unet_name": Input("COMBO", choices="diffusion_models"),
            "weight_dtype": Input("COMBO", choices=["default"]),
        },
        ("MODEL",),
        runs=False,
    ),
    "VAELoader": Node("Load VAE", "loaders", {"vae_name": Input("COMBO", choices="vae")}, ("VAE",)),
    "UpscaleModelLoader": Node(
        "Load Upscale Model", "loaders", {"model_name": Input("COMBO", choices="upscale_models")}, ("UPSCALE_MODEL",)
    ),
    "ImageUpscaleWithModel": Node(
        "Upscale Image (using Model)",
        "image/upscaling",
        {"upscale_model": Input("UPSCALE_MODEL"), "image": Input("IMAGE")},
        ("IMAGE",),
    ),
    "ImageScale": Node(
        "Upscale Image",
        "image/upscaling",
        {
            "image": Input("IMAGE"),
            "upscale_method": Input("COMBO", choices=IMAGE_UPSCALE_METHODS),
            "width": _int(512, 0, MAX_RESOLUTION),
            "height": _int(512, 0, MAX_RESOLUTION),
            "crop": Input("COMBO", choices=["disabled", "center"]),
        },
        ("IMAGE",),
    ),
    "ImageScaleBy": Node(
        "Upscale Image By",
        "image/upscaling",
        {
            "image": Input("IMAGE"),
            "upscale_method": Input("COMBO", choices=IMAGE_UPSCALE_METHODS),
            "scale_by": _float(1.0, 0.01, 8.0),
        },
        ("IMAGE",),
    ),
}


def object_info(name: str, node: Node, lists: dict[str, list[str]]) -> dict[str, Any]:
    """A node as ComfyUI's `/object_info` shows it, its choices read from `lists`."""
    required: dict[str, list[Any]] = {}
    optional: dict[str, list[Any]] = {}
    for input_name, spec in node.inputs.items():
        choices = lists.get(spec.choices, []) if isinstance(spec.choices, str) else spec.choices
        shown = [choices, spec.options] if choices is not None else [spec.kind, spec.options]
        (optional if input_name in node.optional else required)[input_name] = shown if spec.options else shown[:1]
    return {
        "input": {"required": required, "optional": optional},
        "input_order": {"required": list(required), "optional": list(optional)},
        "output": list(node.outputs),
        "output_is_list": [False] * len(node.outputs),
        "output_name": list(node.outputs),
        "name": name,
        "display_name": node.display_name,
        "description": "" if node.runs else "Listed for clients that read it; this server does not run it.",
        "python_module": "nodes",
        "category": node.category,
        "output_node": node.output_node,
    }
