"""The model side of a workflow, recognised (plan.py the rest): the checkpoint and the LoRAs
under a sampler's model, the prompts its conditioning comes from (with the CLIP layer read),
and the ControlNets applied to that conditioning.

- CheckpointLoaderSimple; LoraLoader chained, the same LoRAs on the model and on the CLIP. A
  LoRA has one weight here, on the UNet and the text encoders alike: its two strengths are
  equal, unless the LoRA holds no text-encoder weights (then strength_clip changes nothing,
  and LoraLoaderModelOnly is LoraLoader);
- CLIPSetLastLayer: -n is clip skip n (none: ComfyUI's SDXL default, the penultimate layer);
- CLIPTextEncode, or CLIPTextEncodeSDXL with one text and the output's sizes; read by
  ComfyUI's prompt rule (`prompt_style: comfyui`);
- ControlNetApplyAdvanced (chained: one unit each) with ControlNetLoader (through
  SetUnionControlNetType for a union ControlNet's type) and a LoadImage, or a Canny of one: a
  ControlNet unit, on both prompts as here;
- InpaintModelConditioning, anywhere on the prompts' way (plan.py reads its latent);
- VAELoader: the served VAE, which decodes for every model here;
- on the model: PerturbedAttentionGuidance, FreeU, and RescaleCFG for a v-prediction model only
  (ComfyUI rescales in v-space, which is the model's own space only there).
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from backends.api.comfyui.graph import Workflow, node_error
from backends.sdxl_backend.units import MAX_CONTROLNETS, MAX_LORAS, ControlNetUnit, LoraWeight

ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSDXL")
LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly")
MODEL_PATCHES = ("PerturbedAttentionGuidance", "RescaleCFG", "FreeU")


MODEL_FILE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin)$")


def served_id(name: str) -> str:
    """A served model's id from the name a ComfyUI client sends: the id, or it as a file name."""
    return MODEL_FILE.sub("", name)


@dataclass(frozen=True)
class Served:
    """What planning asks of the server: an upload's bytes by name, and facts of served models
    by id: an upscale model's scale, whether a LoRA changes the text encoders, whether a model
    predicts v (v-prediction)."""

    upload: Callable[[str], bytes | None]
    upscaler_scale: Callable[[str], int]
    lora_changes_clip: Callable[[str], bool]
    predicts_v: Callable[[str], bool]


class GraphReader:
    """A checked workflow read for planning: links followed to the classes expected, and each
    request field set with the node and input it came from (`fields`)."""

    def __init__(self, workflow: Workflow, served: Served):
        self.workflow, self.served = workflow, served
        self.fields: dict[str, tuple[str, str]] = {}
        self.values: dict[str, Any] = {}

    def refuse(self, node_id: str, input_name: str | None, message: str) -> Exception:
        return node_error(node_id, self.workflow.class_of(node_id), input_name, message, "not_runnable_here")

    def source(self, node_id: str, name: str, *classes: str) -> tuple[str, int]:
        """The node an input links to, which must be of one of `classes`."""
        source, index = self.workflow.link(node_id, name)
        if self.workflow.class_of(source) not in classes:
            wanted = " or ".join(classes)
            raise self.refuse(
                node_id,
                name,
                f"{name} comes from a {self.workflow.class_of(source)} here; this server runs it from {wanted}",
            )
        return source, index

    def set(self, request_field: str, value: Any, node_id: str, input_name: str) -> None:
        self.values[request_field] = value
        self.fields[request_field] = (node_id, input_name)

    def picture(self, node_id: str) -> bytes:
        """A LoadImage's upload."""
        name = self.workflow.value(node_id, "image")
        data = self.served.upload(name) if isinstance(name, str) else None
        if data is None:
            raise self.refuse(node_id, "image", f"no uploaded image '{name}' (POST /upload/image gives its name)")
        return data


class ConditioningPlanner(GraphReader):
    def __init__(self, *arguments: Any):
        super().__init__(*arguments)
        self.sdxl_encoders: list[str] = []  # CLIPTextEncodeSDXL nodes, whose sizes are checked at the end
        self.inpaint_conditioning: str | None = None  # the InpaintModelConditioning the prompts pass through

    def model_side(self, sampler: str) -> None:
        """The model, LoRAs, prompts, clip skip and ControlNets of a sampler."""
        checkpoint, loras = self.model_chain(sampler)
        self.set("model", served_id(self.workflow.value(checkpoint, "ckpt_name")), checkpoint, "ckpt_name")
        self.values.setdefault("guidance_rescale", 0.0)  # (ComfyUI rescales only where RescaleCFG says so)
        if self.values["guidance_rescale"] and not self.served.predicts_v(self.values["model"]):
            node_id, input_name = self.fields["guidance_rescale"]
            raise self.refuse(
                node_id,
                input_name,
                "ComfyUI rescales CFG on the v-prediction it makes of any model; here CFG rescale acts on "
                "the model's own prediction, the same only for a v-prediction model, which this one is not",
            )
        positive, negative = self.controlnets(sampler)
        prompts = {}
        for request_field, (node, name) in (("prompt", positive), ("negative_prompt", negative)):
            encoder, _ = self.source(node, name, *ENCODERS)
            text = self.encoder_text(encoder)
            clip_checkpoint, clip_loras, clip_skip = self.clip_chain(encoder)
            if self.workflow.value(clip_checkpoint, "ckpt_name") != self.workflow.value(checkpoint, "ckpt_name"):
                raise self.refuse(encoder, "clip", "the CLIP must come from the sampler's model")
            if clip_loras != loras:
                raise self.refuse(encoder, "clip", "the CLIP must have the model's LoRAs (LoraLoader's), as the model")
            self.set(request_field, text, encoder, "text_g" if encoder in self.sdxl_encoders else "text")
            prompts[request_field] = (encoder, clip_skip)
        if prompts["prompt"][1] != prompts["negative_prompt"][1]:
            raise self.refuse(prompts["negative_prompt"][0], "clip", "both prompts are read at one CLIP layer here")
        self.values["clip_skip"] = prompts["prompt"][1]
        self.values["prompt_style"] = "comfyui"  # (CLIPTextEncode reads weights by ComfyUI's rule)

    def encoder_text(self, encoder: str) -> str:
        if self.workflow.class_of(encoder) != "CLIPTextEncodeSDXL":
            return self.workflow.value(encoder, "text")
        if self.workflow.value(encoder, "text_g") != self.workflow.value(encoder, "text_l"):
            raise self.refuse(encoder, "text_l", "both encoders read one text here: text_l = text_g")
        self.sdxl_encoders.append(encoder)
        return self.workflow.value(encoder, "text_g")

    def model_chain(self, sampler: str) -> tuple[str, list[tuple[str, float]]]:
        """The CheckpointLoaderSimple under a sampler's model, and the LoRAs on it (nearest the
        checkpoint first), each with the strength the CLIP must have it at (none: not on the CLIP)."""
        loras: list[tuple[str, float]] = []
        chain = ("CheckpointLoaderSimple", *LORA_LOADERS)
        node_id, _ = self.source(sampler, "model", *chain, *MODEL_PATCHES)
        while self.workflow.class_of(node_id) in MODEL_PATCHES:  # (on the model as it reaches the sampler)
            self.model_patch(node_id)
            node_id, _ = self.source(node_id, "model", *chain, *MODEL_PATCHES)
        weights: list[tuple[str, float]] = []
        while self.workflow.class_of(node_id) in LORA_LOADERS:
            name, strength = self.workflow.value(node_id, "lora_name"), self.workflow.value(node_id, "strength_model")
            if abs(strength) > 4 or len(weights) == MAX_LORAS:
                raise self.refuse(node_id, "strength_model", f"at most {MAX_LORAS} LoRAs, of weights -4 to 4, here")
            model_only = self.workflow.class_of(node_id) == "LoraLoaderModelOnly"
            if self.served.lora_changes_clip(served_id(name)) and (
                model_only or self.workflow.value(node_id, "strength_clip") != strength
            ):
                raise self.refuse(
                    node_id,
                    "lora_name" if model_only else "strength_clip",
                    "this LoRA changes the text encoders too, and has one weight on both here: "
                    "LoraLoader with strength_clip = strength_model",
                )
            weights.insert(0, (name, strength))
            if not model_only:
                loras.insert(0, (name, self.workflow.value(node_id, "strength_clip")))
            node_id, _ = self.source(node_id, "model", *chain)
        self.values["loras"] = [LoraWeight(id=served_id(name), weight=weight) for name, weight in weights]
        return node_id, loras

    def model_patch(self, node_id: str) -> None:
        """PerturbedAttentionGuidance is `pag_scale`; RescaleCFG `guidance_rescale` (checked
        against the model in `model_side`); FreeU `freeu` (ComfyUI's FreeU is the first one,
        diffusers' too: half the backbone's channels scaled, the skips' low frequencies damped)."""
        kind, value = self.workflow.class_of(node_id), self.workflow.value
        field = {"PerturbedAttentionGuidance": "pag_scale", "RescaleCFG": "guidance_rescale", "FreeU": "freeu"}[kind]
        if field in self.values:
            raise self.refuse(node_id, "model", f"one {kind} on a sampler's model here")
        if kind == "PerturbedAttentionGuidance":
            if value(node_id, "scale") > 10:
                raise self.refuse(node_id, "scale", "PAG's scale is at most 10 here")
            self.set("pag_scale", value(node_id, "scale"), node_id, "scale")
        elif kind == "RescaleCFG":
            self.set("guidance_rescale", value(node_id, "multiplier"), node_id, "multiplier")
        else:
            self.set("freeu", {name: value(node_id, name) for name in ("s1", "s2", "b1", "b2")}, node_id, "b1")

    def clip_chain(self, encoder: str) -> tuple[str, list[tuple[str, float]], int]:
        """The CheckpointLoaderSimple under an encoder's CLIP, its LoRAs, and the layer read."""
        loras: list[tuple[str, float]] = []
        clip_skip = None
        chain = ("CheckpointLoaderSimple", "LoraLoader", "CLIPSetLastLayer")
        node_id, _ = self.source(encoder, "clip", *chain)
        while self.workflow.class_of(node_id) != "CheckpointLoaderSimple":
            if self.workflow.class_of(node_id) == "CLIPSetLastLayer":
                # The one nearest the encoder decides (each sets the layer outright).
                clip_skip = clip_skip or -self.workflow.value(node_id, "stop_at_clip_layer")
                if clip_skip > 12:
                    raise self.refuse(node_id, "stop_at_clip_layer", "SDXL's CLIP-L has 12 layers: -12 to -1")
            else:
                strength = self.workflow.value(node_id, "strength_clip")
                loras.insert(0, (self.workflow.value(node_id, "lora_name"), strength))
            node_id, _ = self.source(node_id, "clip", *chain)
        return node_id, loras, clip_skip or 2

    def controlnets(self, sampler: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """The ControlNetApplyAdvanced nodes between the sampler and its prompts, as units (the
        one nearest the prompts first); returns where the prompts' links start: (node, input)."""
        units: list[ControlNetUnit] = []
        positive, negative = (sampler, "positive"), (sampler, "negative")
        while True:
            source, index = self.workflow.link(*positive)
            kind = self.workflow.class_of(source)
            if kind not in ("ControlNetApplyAdvanced", "InpaintModelConditioning"):
                break
            if index != 0 or self.workflow.link(*negative) != (source, 1):
                raise self.refuse(positive[0], negative[1], f"positive and negative come from one {kind} here")
            if kind == "InpaintModelConditioning":  # (its latent is checked with the sampler's: plan.py)
                if self.inpaint_conditioning not in (None, source):
                    raise self.refuse(source, "positive", "one InpaintModelConditioning per sampler here")
                self.inpaint_conditioning = source
            else:
                units.insert(0, self.controlnet_unit(source))
            positive, negative = (source, "positive"), (source, "negative")
        if len(units) > MAX_CONTROLNETS:
            raise self.refuse(positive[0], "control_net", f"at most {MAX_CONTROLNETS} ControlNets here")
        if units:
            self.values["controlnets"] = units
        return positive, negative

    def controlnet_unit(self, node_id: str) -> ControlNetUnit:
        value = self.workflow.value
        loader, _ = self.source(node_id, "control_net", "ControlNetLoader", "SetUnionControlNetType")
        union = {}
        if self.workflow.class_of(loader) == "SetUnionControlNetType":  # (a union ControlNet's type)
            if value(loader, "type") == "auto":
                raise self.refuse(loader, "type", "a union ControlNet is told what its image is here, not auto")
            union = {"control_type": value(loader, "type")}
            loader, _ = self.source(loader, "control_net", "ControlNetLoader")
        if "vae" in self.workflow.nodes[node_id]["inputs"]:
            self.check_vae(node_id)
        image, _ = self.source(node_id, "image", "LoadImage", "Canny")
        canny = {}
        if self.workflow.class_of(image) == "Canny":  # (its thresholds are fractions of full scale)
            canny = {
                "preprocess": "canny",
                "low_threshold": round(value(image, "low_threshold") * 255),
                "high_threshold": round(value(image, "high_threshold") * 255),
            }
            image, _ = self.source(image, "image", "LoadImage")
        if value(node_id, "strength") > 2:
            raise self.refuse(node_id, "strength", "a ControlNet's strength is at most 2 here")
        return ControlNetUnit(
            id=served_id(value(loader, "control_net_name")),
            image=self.picture(image),
            scale=value(node_id, "strength"),
            start=value(node_id, "start_percent"),
            end=value(node_id, "end_percent"),
            **canny,
            **union,
        )

    def check_vae(self, node_id: str) -> None:
        """A VAE input: the model's checkpoint's (or its refiner's), or VAELoader's (the served
        SDXL_VAE, which decodes for every model here, so they are the same VAE)."""
        source, _ = self.source(node_id, "vae", "CheckpointLoaderSimple", "VAELoader")
        if self.workflow.class_of(source) == "CheckpointLoaderSimple":
            model = served_id(self.workflow.value(source, "ckpt_name"))
            refiner = self.values.get("refiner")
            if model not in (self.values["model"], refiner.model if refiner else None):
                raise self.refuse(node_id, "vae", "the VAE comes from another checkpoint than the model's")

    def check_size_conditioning(self) -> None:
        """CLIPTextEncodeSDXL's sizes are the ones SDXL is conditioned on here: the output's,
        uncropped (the pipelines' own)."""
        if not self.sdxl_encoders:
            return
        if "image" in self.values:
            width, height = Image.open(io.BytesIO(self.values["image"])).size
        else:
            width, height = self.values["width"], self.values["height"]
        wanted = {"width": width, "height": height, "target_width": width, "target_height": height}
        for encoder in self.sdxl_encoders:  # (a refiner's encoder has width and height alone)
            for name, size in {**wanted, "crop_w": 0, "crop_h": 0}.items():
                if name in self.workflow.nodes[encoder]["inputs"] and self.workflow.value(encoder, name) != size:
                    raise self.refuse(encoder, name, f"SDXL is conditioned on the output's size here: {name} {size}")
