"""What a checked workflow draws, as one `GenerationRequest`: the graph is recognised, never
interpreted. The wirings recognised are those of ComfyUI's own examples:

- txt2img: EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage/PreviewImage;
- img2img: LoadImage -> VAEEncode -> KSampler (its denoise the strength);
- inpainting: VAEEncodeForInpaint (the masked area starts from nothing: `masked_content` fill)
  or VAEEncode -> SetLatentNoiseMask (it starts from the image), the mask from LoadImage's
  alpha or LoadImageMask's channel;
- the hires fix: KSampler -> LatentUpscale/LatentUpscaleBy (bilinear, as the latent upscale
  here) -> KSampler with the first one's settings and a denoise below 1;
- on the model and CLIP side: CheckpointLoaderSimple, LoraLoader (its two strengths equal: a
  LoRA here has one weight), CLIPSetLastLayer (-n is clip skip n; none is ComfyUI's SDXL
  default, the penultimate layer: clip skip 2), CLIPTextEncode or CLIPTextEncodeSDXL (one
  text, the output's sizes), VAELoader (the served VAE, every model's here);
- RepeatLatentBatch on the empty latent: more images.

Anything else a check passed (two pictures in one prompt, a second sampler that differs from
the first, a method or value with no exact counterpart here) is refused with the node and the
input that would have to change. `Plan.fields` maps each request field back to its node and
input, so an error the engine finds later (a size off the server's limits) names them too.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter, ImageOps
from pydantic import ValidationError

from backends.api.comfyui.graph import Workflow, node_error
from backends.api.comfyui.nodes import NODES, PAIRS
from backends.sdxl_backend.protocol import MAX_LORAS, GenerationRequest, HiresFix, LoraWeight

SEED_RANGE = 2**32  # the pipeline's seeds; ComfyUI's 64-bit ones are taken modulo this


@dataclass
class Plan:
    request: GenerationRequest
    outputs: dict[str, str]  # output node id -> the image type it shows ("output", or "temp" for previews)
    sampler: str  # the node whose steps the progress events count (the last sampler)
    executed: list[str]  # the nodes run, in an order ComfyUI could run them
    fields: dict[str, tuple[str, str]] = field(default_factory=dict)  # request field -> (node id, input)


class Planner:
    def __init__(
        self,
        workflow: Workflow,
        model_id: Callable[[str], str],
        lora_id: Callable[[str], str],
        upload: Callable[[str], bytes | None],
    ):
        self.workflow, self.model_id, self.lora_id, self.upload = workflow, model_id, lora_id, upload
        self.fields: dict[str, tuple[str, str]] = {}
        self.values: dict[str, Any] = {}
        self.sdxl_encoders: list[str] = []  # CLIPTextEncodeSDXL nodes, whose sizes are checked at the end

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

    # -- the plan --

    def plan(self) -> Plan:
        workflow = self.workflow
        decode = None
        for output in workflow.outputs:
            node, _ = self.source(output, "images", "VAEDecode")
            if decode not in (None, node):
                raise self.refuse(
                    output, "images", "one picture per prompt here: every output shows the same VAEDecode"
                )
            decode = node
        assert decode is not None  # (a checked workflow has outputs)
        sampler, _ = self.source(decode, "samples", "KSampler")
        self.sampling(sampler)
        self.check_vae(decode)
        self.latent(sampler)
        self.check_size_conditioning()
        try:
            request = GenerationRequest(**self.values)
        except ValidationError as exc:  # (a value past a bound of the request here)
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else ""
            node_id, input_name = self.fields.get(name, (sampler, name))
            raise self.refuse(node_id, input_name, f"{input_name}: {first['msg']}") from None
        outputs = {
            node_id: "output" if workflow.class_of(node_id) == "SaveImage" else "temp" for node_id in workflow.outputs
        }
        return Plan(request, outputs, sampler, self.order(), self.fields)

    def sampling(self, sampler: str) -> None:
        """The sampler's settings, model, LoRAs and prompts."""
        value = self.workflow.value
        pair = (value(sampler, "sampler_name"), value(sampler, "scheduler"))
        if pair not in PAIRS:
            takes = [scheduler for name, scheduler in PAIRS if name == pair[0]]
            raise self.refuse(
                sampler, "scheduler", f"sampler '{pair[0]}' runs here with the scheduler {' or '.join(takes)}"
            )
        self.set("scheduler", PAIRS[pair], sampler, "scheduler")
        self.set("seed", value(sampler, "seed") % SEED_RANGE, sampler, "seed")
        self.set("steps", value(sampler, "steps"), sampler, "steps")
        self.set("guidance_scale", value(sampler, "cfg"), sampler, "cfg")
        checkpoint, loras = self.model_chain(sampler)
        self.set("model", self.model_id(checkpoint), *self.fields.pop("checkpoint"))
        prompts = {}
        for side in ("positive", "negative"):
            encoder, _ = self.source(sampler, side, "CLIPTextEncode", "CLIPTextEncodeSDXL")
            if self.workflow.class_of(encoder) == "CLIPTextEncodeSDXL":
                if value(encoder, "text_g") != value(encoder, "text_l"):
                    raise self.refuse(encoder, "text_l", "both encoders read one text here: text_l = text_g")
                self.sdxl_encoders.append(encoder)
            text = value(encoder, "text") if encoder not in self.sdxl_encoders else value(encoder, "text_g")
            clip_checkpoint, clip_loras, clip_skip = self.clip_chain(encoder)
            if clip_checkpoint != checkpoint or clip_loras != loras:
                raise self.refuse(encoder, "clip", "the CLIP must come from the sampler's model, with the same LoRAs")
            prompts[side] = (encoder, text, clip_skip)
        if prompts["positive"][2] != prompts["negative"][2]:
            raise self.refuse(prompts["negative"][0], "clip", "both prompts are read at the same CLIP layer here")
        for side, request_field in (("positive", "prompt"), ("negative", "negative_prompt")):
            encoder = prompts[side][0]
            self.set(request_field, prompts[side][1], encoder, "text_g" if encoder in self.sdxl_encoders else "text")
        self.values["clip_skip"] = prompts["positive"][2]
        self.values["prompt_style"] = "comfyui"  # (CLIPTextEncode reads weights by ComfyUI's rule)
        self.values["loras"] = [LoraWeight(id=self.lora_id(name), weight=weight) for name, weight in loras]

    def model_chain(self, sampler: str) -> tuple[str, list[tuple[str, float]]]:
        """The checkpoint under a sampler's model, and the LoRAs on it (nearest the checkpoint first)."""
        loras: list[tuple[str, float]] = []
        node_id, _ = self.source(sampler, "model", "CheckpointLoaderSimple", "LoraLoader")
        while self.workflow.class_of(node_id) == "LoraLoader":
            strength = self.workflow.value(node_id, "strength_model")
            if strength != self.workflow.value(node_id, "strength_clip"):
                raise self.refuse(
                    node_id, "strength_clip", "a LoRA has one weight here: strength_clip = strength_model"
                )
            if abs(strength) > 4 or len(loras) == MAX_LORAS:
                raise self.refuse(node_id, "strength_model", f"at most {MAX_LORAS} LoRAs, of weights -4 to 4, here")
            loras.insert(0, (self.workflow.value(node_id, "lora_name"), strength))
            node_id, _ = self.source(node_id, "model", "CheckpointLoaderSimple", "LoraLoader")
        self.fields["checkpoint"] = (node_id, "ckpt_name")
        return self.workflow.value(node_id, "ckpt_name"), loras

    def clip_chain(self, encoder: str) -> tuple[str, list[tuple[str, float]], int]:
        """The checkpoint under an encoder's CLIP, its LoRAs, and the layer read (clip skip)."""
        loras: list[tuple[str, float]] = []
        clip_skip = None
        node_id, _ = self.source(encoder, "clip", "CheckpointLoaderSimple", "LoraLoader", "CLIPSetLastLayer")
        while self.workflow.class_of(node_id) != "CheckpointLoaderSimple":
            if self.workflow.class_of(node_id) == "CLIPSetLastLayer":
                # The one nearest the encoder decides (each sets the layer outright).
                clip_skip = clip_skip or -self.workflow.value(node_id, "stop_at_clip_layer")
                if clip_skip > 12:
                    raise self.refuse(node_id, "stop_at_clip_layer", "SDXL's CLIP-L has 12 layers: -12 to -1")
            else:
                loras.insert(
                    0, (self.workflow.value(node_id, "lora_name"), self.workflow.value(node_id, "strength_clip"))
                )
            node_id, _ = self.source(node_id, "clip", "CheckpointLoaderSimple", "LoraLoader", "CLIPSetLastLayer")
        return self.workflow.value(node_id, "ckpt_name"), loras, clip_skip or 2

    def check_vae(self, node_id: str) -> None:
        """A VAE input: the model's checkpoint's, or VAELoader's (the served SDXL_VAE, which
        decodes for every model here, so the two are the same VAE)."""
        source, _ = self.source(node_id, "vae", "CheckpointLoaderSimple", "VAELoader")
        if self.workflow.class_of(source) == "CheckpointLoaderSimple":
            if self.model_id(self.workflow.value(source, "ckpt_name")) != self.values["model"]:
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
        for encoder in self.sdxl_encoders:
            for name, size in {**wanted, "crop_w": 0, "crop_h": 0}.items():
                if self.workflow.value(encoder, name) != size:
                    raise self.refuse(encoder, name, f"SDXL is conditioned on the output's size here: {name} {size}")

    def latent(self, sampler: str) -> None:
        """What the sampler starts from: an empty latent, an encoded image (with a mask), or
        a first sampler's latent upscaled (the hires fix)."""
        workflow, value = self.workflow, self.workflow.value
        source, _ = self.source(
            sampler,
            "latent_image",
            "EmptyLatentImage",
            "RepeatLatentBatch",
            "VAEEncode",
            "VAEEncodeForInpaint",
            "SetLatentNoiseMask",
            "LatentUpscale",
            "LatentUpscaleBy",
        )
        kind = workflow.class_of(source)
        denoise = value(sampler, "denoise")
        if kind == "EmptyLatentImage":
            return self.empty_latent(sampler, source)
        if kind == "RepeatLatentBatch":  # (an empty latent repeated: more images, seeds seed + i)
            empty, _ = self.source(source, "samples", "EmptyLatentImage")
            self.empty_latent(sampler, empty)
            self.set("n", self.values["n"] * value(source, "amount"), source, "amount")
            return
        if kind in ("LatentUpscale", "LatentUpscaleBy"):
            return self.hires_fix(sampler, source)
        if denoise <= 0:
            raise self.refuse(sampler, "denoise", "a denoise of 0 repaints nothing")
        self.set("strength", denoise, sampler, "denoise")
        if kind == "SetLatentNoiseMask":
            self.values["masked_content"] = "original"
            self.set("mask", self.mask(source, "mask", 0), source, "mask")
            source, _ = self.source(source, "samples", "VAEEncode")
        elif kind == "VAEEncodeForInpaint":
            self.values["masked_content"] = "fill"
            self.set("mask", self.mask(source, "mask", value(source, "grow_mask_by")), source, "mask")
        if "mask" in self.values:
            self.values["mask_blur"] = 0  # (ComfyUI's mask is used as it is)
        self.check_vae(source)
        image, _ = self.source(source, "pixels", "LoadImage")
        self.set("image", self.picture(image), image, "image")
        self.fields["width"] = self.fields["height"] = (image, "image")  # (the size is the image's)

    def empty_latent(self, sampler: str, latent: str) -> None:
        if self.workflow.value(sampler, "denoise") != 1:
            raise self.refuse(sampler, "denoise", "from an empty latent, the denoise is 1")
        for name, request_field in (("width", "width"), ("height", "height"), ("batch_size", "n")):
            self.set(request_field, self.workflow.value(latent, name), latent, name)

    def hires_fix(self, sampler: str, upscale: str) -> None:
        value = self.workflow.value
        if value(upscale, "upscale_method") != "bilinear":
            raise self.refuse(upscale, "upscale_method", "the latent upscale here is bilinear")
        first, _ = self.source(upscale, "samples", "KSampler")
        for name in ("seed", "cfg", "sampler_name", "scheduler", "model", "positive", "negative"):
            if value(first, name) != value(sampler, name):
                raise self.refuse(sampler, name, f"the second pass of a hires fix takes the first one's {name} here")
        latent, _ = self.source(first, "latent_image", "EmptyLatentImage")
        self.empty_latent(first, latent)
        denoise = value(sampler, "denoise")
        if not 0 < denoise < 1:
            raise self.refuse(
                sampler, "denoise", "the second pass of a hires fix repaints part of the image: 0 < denoise < 1"
            )
        if self.workflow.class_of(upscale) == "LatentUpscale":
            if value(upscale, "crop") != "disabled":
                raise self.refuse(upscale, "crop", "the latent upscale here does not crop")
            size = {"width": value(upscale, "width"), "height": value(upscale, "height")}
        else:
            size = {"scale": value(upscale, "scale_by")}
        self.set("hires_fix", HiresFix(**size, strength=denoise, steps=value(sampler, "steps")), upscale, "samples")
        self.fields["steps"] = (first, "steps")

    def picture(self, node_id: str) -> bytes:
        name = self.workflow.value(node_id, "image")
        data = self.upload(name) if isinstance(name, str) else None
        if data is None:
            raise self.refuse(node_id, "image", f"no uploaded image '{name}' (POST /upload/image gives its name)")
        return data

    def mask(self, node_id: str, name: str, grow: int) -> bytes:
        """A mask as the engine takes it (white repaints), from ComfyUI's MASK (1 repaints):
        LoadImage's is its alpha inverted, LoadImageMask's the channel it names."""
        source, index = self.source(node_id, name, "LoadImage", "LoadImageMask")
        picture = Image.open(io.BytesIO(self.picture(source)))
        if self.workflow.class_of(source) == "LoadImage" or self.workflow.value(source, "channel") == "alpha":
            alpha = picture.convert("RGBA").getchannel("A") if "A" in picture.getbands() else None
            mask = ImageOps.invert(alpha) if alpha is not None else Image.new("L", picture.size, 0)
        else:
            mask = picture.convert("RGB").getchannel("RGB".index(self.workflow.value(source, "channel")[0].upper()))
        if grow:  # ComfyUI's growth: a square of side 2 x grow + 1 around each masked pixel
            mask = mask.filter(ImageFilter.MaxFilter(2 * grow + 1))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        return buffer.getvalue()

    def order(self) -> list[str]:
        """The nodes the outputs depend on, each after its inputs (ComfyUI runs no other)."""
        ordered: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in ordered:
                return
            for name, spec in NODES[self.workflow.class_of(node_id)].inputs.items():
                if spec.is_link:
                    visit(self.workflow.link(node_id, name)[0])
            ordered.append(node_id)

        for output in self.workflow.outputs:
            visit(output)
        return ordered
