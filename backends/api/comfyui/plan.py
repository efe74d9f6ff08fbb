"""What a checked workflow draws, as one `GenerationRequest`: the graph is recognised, never
interpreted. The wirings recognised are those of ComfyUI's own examples (conditioning.py reads
the model side: checkpoint, LoRAs, prompts, clip skip, ControlNets):

- txt2img: EmptyLatentImage (or RepeatLatentBatch of one) -> KSampler -> VAEDecode ->
  SaveImage/PreviewImage; a KSamplerAdvanced that runs every step with its own noise is a KSampler;
- img2img: LoadImage -> VAEEncode -> KSampler (its denoise the strength);
- inpainting: VAEEncodeForInpaint (the masked area starts from nothing: `masked_content` fill),
  or VAEEncode -> SetLatentNoiseMask, or InpaintModelConditioning (it starts from the image),
  the mask from LoadImage's alpha or LoadImageMask's channel;
- the hires fix: KSampler -> LatentUpscale/LatentUpscaleBy (bilinear, as the latent upscale
  here) -> KSampler with the first one's settings and a denoise below 1;
- the refiner: KSamplerAdvanced (steps 0 to E, leftover noise returned) -> KSamplerAdvanced on
  the refiner's checkpoint (no noise added, E to the end, the same steps, cfg, sampler,
  scheduler and texts): `refiner.switch_at` E / steps.

Anything else a check passed (two pictures in one prompt, a second sampler that differs from
the first, a method or value with no exact counterpart here) is refused with the node and the
input that would have to change. `Plan.fields` maps each request field back to its node and
input, so an error the engine finds later (a size off the server's limits) names them too.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter, ImageOps
from pydantic import ValidationError

from backends.api.comfyui.conditioning import ConditioningPlanner, served_id
from backends.api.comfyui.nodes import NODES, PAIRS
from backends.sdxl_backend.protocol import GenerationRequest, HiresFix, Refiner

SEED_RANGE = 2**32  # the pipeline's seeds; ComfyUI's 64-bit ones are taken modulo this
SAMPLERS = ("KSampler", "KSamplerAdvanced")
REFINER_SCORES = {"positive": 6.0, "negative": 2.5}  # the aesthetic scores the refiner is conditioned on here


@dataclass
class Plan:
    request: GenerationRequest
    outputs: dict[str, str]  # output node id -> the image type it shows ("output", or "temp" for previews)
    sampler: str  # the node whose steps the progress events count (the last sampler)
    executed: list[str]  # the nodes run, in an order ComfyUI could run them
    fields: dict[str, tuple[str, str]] = field(default_factory=dict)  # request field -> (node id, input)


class Planner(ConditioningPlanner):
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
        last, _ = self.source(decode, "samples", *SAMPLERS)
        refined = workflow.class_of(last) == "KSamplerAdvanced" and workflow.value(last, "add_noise") == "disable"
        sampler = self.refiner_source(last) if refined else last
        self.sampling(sampler)
        self.model_side(sampler)
        if refined:
            self.refiner(sampler, last)
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
        return Plan(request, outputs, last, self.order(), self.fields)

    def setting(self, sampler: str, name: str) -> Any:
        """A sampler's setting by KSampler's name (KSamplerAdvanced calls its seed noise_seed)."""
        if name == "seed" and self.workflow.class_of(sampler) == "KSamplerAdvanced":
            name = "noise_seed"
        return self.workflow.value(sampler, name)

    def denoise(self, sampler: str) -> float:
        """KSampler's denoise; a KSamplerAdvanced runs every step of its own noise here (1.0)."""
        if self.workflow.class_of(sampler) == "KSampler":
            return self.workflow.value(sampler, "denoise")
        value = self.workflow.value
        if value(sampler, "add_noise") != "enable" or value(sampler, "start_at_step") != 0:
            raise self.refuse(sampler, "start_at_step", "a KSamplerAdvanced here adds its noise and starts at step 0")
        if value(sampler, "end_at_step") < value(sampler, "steps") and not self.values.get("refiner"):
            raise self.refuse(
                sampler, "end_at_step", "a KSamplerAdvanced here runs to its last step (or hands to a refiner)"
            )
        return 1.0

    def sampling(self, sampler: str) -> None:
        """The sampler's settings: scheduler, seed, steps, guidance."""
        pair = (self.setting(sampler, "sampler_name"), self.setting(sampler, "scheduler"))
        if pair not in PAIRS:
            takes = [scheduler for name, scheduler in PAIRS if name == pair[0]]
            raise self.refuse(
                sampler, "scheduler", f"sampler '{pair[0]}' runs here with the scheduler {' or '.join(takes)}"
            )
        seed_input = "noise_seed" if self.workflow.class_of(sampler) == "KSamplerAdvanced" else "seed"
        self.set("scheduler", PAIRS[pair], sampler, "scheduler")
        self.set("seed", int(self.setting(sampler, "seed")) % SEED_RANGE, sampler, seed_input)
        self.set("steps", self.setting(sampler, "steps"), sampler, "steps")
        self.set("guidance_scale", self.setting(sampler, "cfg"), sampler, "cfg")

    def refiner_source(self, refining: str) -> str:
        """The base's KSamplerAdvanced under a refiner's pass (checked in `refiner`)."""
        base, _ = self.source(refining, "latent_image", "KSamplerAdvanced")
        return base

    def refiner(self, base: str, refining: str) -> None:
        """The refiner's pass: the base stops at step E returning its leftover noise; the
        refiner's checkpoint takes it from E to the end with the same settings and texts."""
        value = self.workflow.value
        switch = value(base, "end_at_step")
        if value(base, "return_with_leftover_noise") != "enable" or not 0 < switch < value(base, "steps"):
            raise self.refuse(base, "end_at_step", "the base hands over before its last step, with leftover noise")
        for name in ("steps", "cfg", "sampler_name", "scheduler"):
            if value(refining, name) != value(base, name):
                raise self.refuse(refining, name, f"the refiner's pass takes the base's {name} here")
        if value(refining, "start_at_step") != switch or value(refining, "end_at_step") < value(base, "steps"):
            raise self.refuse(
                refining, "start_at_step", f"the refiner runs from the base's end ({switch}) to the last step"
            )
        if value(refining, "return_with_leftover_noise") != "disable":
            raise self.refuse(refining, "return_with_leftover_noise", "the refiner's pass ends the denoising")
        checkpoint, _ = self.source(refining, "model", "CheckpointLoaderSimple")
        self.set(
            "refiner",
            Refiner(model=served_id(value(checkpoint, "ckpt_name")), switch_at=switch / value(base, "steps")),
            checkpoint,
            "ckpt_name",
        )
        for side, text in (("positive", self.values["prompt"]), ("negative", self.values["negative_prompt"])):
            encoder, _ = self.source(refining, side, "CLIPTextEncode", "CLIPTextEncodeSDXLRefiner")
            clip, _ = self.source(encoder, "clip", "CheckpointLoaderSimple")
            if value(clip, "ckpt_name") != value(checkpoint, "ckpt_name") or value(encoder, "text") != text:
                raise self.refuse(encoder, "text", "the refiner reads the base's texts here, through its own CLIP")
            if self.workflow.class_of(encoder) == "CLIPTextEncodeSDXLRefiner":
                if value(encoder, "ascore") != REFINER_SCORES[side]:
                    raise self.refuse(
                        encoder, "ascore", f"the refiner's {side} aesthetic score is {REFINER_SCORES[side]} here"
                    )
                self.sdxl_encoders.append(encoder)

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
            "InpaintModelConditioning",
            "LatentUpscale",
            "LatentUpscaleBy",
        )
        kind = workflow.class_of(source)
        if (kind == "InpaintModelConditioning") != (self.inpaint_conditioning is not None) or (
            kind == "InpaintModelConditioning" and source != self.inpaint_conditioning
        ):
            raise self.refuse(
                sampler, "latent_image", "the latent and the prompts come from one InpaintModelConditioning here"
            )
        denoise = self.denoise(sampler)
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
        if kind == "VAEEncode" and self.workflow.class_of(self.workflow.link(source, "pixels")[0]) != "LoadImage":
            self.check_vae(source)
            pixels, _ = self.source(source, "pixels", "ImageScale", "ImageScaleBy", "ImageUpscaleWithModel")
            return self.upscaler_hires_fix(sampler, pixels)
        self.set("strength", denoise, sampler, "denoise")
        if kind == "SetLatentNoiseMask":
            self.values["masked_content"] = "original"
            self.set("mask", self.mask(source, "mask", 0), source, "mask")
            source, _ = self.source(source, "samples", "VAEEncode")
        elif kind == "VAEEncodeForInpaint":
            self.values["masked_content"] = "fill"
            self.set("mask", self.mask(source, "mask", value(source, "grow_mask_by")), source, "mask")
        elif kind == "InpaintModelConditioning":
            # Its latent is the image's, with the mask as the noise mask: SetLatentNoiseMask's
            # (its masked image rides on the prompts, which an inpainting model's pipeline here
            # makes from the same image and mask).
            if value(source, "noise_mask") is False:
                raise self.refuse(source, "noise_mask", "inpainting here keeps the image outside the mask: true")
            self.values["masked_content"] = "original"
            self.set("mask", self.mask(source, "mask", 0), source, "mask")
        if "mask" in self.values:
            self.values["mask_blur"] = 0  # (ComfyUI's mask is used as it is)
        self.check_vae(source)
        image, _ = self.source(source, "pixels", "LoadImage")
        self.set("image", self.picture(image), image, "image")
        self.fields["width"] = self.fields["height"] = (image, "image")  # (the size is the image's)

    def empty_latent(self, sampler: str, latent: str) -> None:
        if self.denoise(sampler) != 1:
            raise self.refuse(sampler, "denoise", "from an empty latent, the denoise is 1")
        for name, request_field in (("width", "width"), ("height", "height"), ("batch_size", "n")):
            self.set(request_field, self.workflow.value(latent, name), latent, name)

    def hires_fix(self, sampler: str, upscale: str) -> None:
        """The latent hires fix: the first sampler's latents upscaled (bilinear, as here)."""
        value = self.workflow.value
        if value(upscale, "upscale_method") != "bilinear":
            raise self.refuse(upscale, "upscale_method", "the latent upscale here is bilinear")
        first, _ = self.source(upscale, "samples", "KSampler")
        if self.workflow.class_of(upscale) == "LatentUpscale":
            if value(upscale, "crop") != "disabled":
                raise self.refuse(upscale, "crop", "the latent upscale here does not crop")
            size: dict[str, Any] = {"width": value(upscale, "width"), "height": value(upscale, "height")}
        else:
            size = {"scale": value(upscale, "scale_by")}
        self.second_pass(sampler, first, upscale, {**size, "upscaler": "latent"})

    def upscaler_hires_fix(self, sampler: str, pixels: str) -> None:
        """The upscaler's hires fix: the first image through an upscale model (one pass), resized
        with Lanczos (ImageScale/ImageScaleBy, as the hires fix resizes here), encoded again."""
        value, size = self.workflow.value, {}
        if self.workflow.class_of(pixels) in ("ImageScale", "ImageScaleBy"):
            if value(pixels, "upscale_method") != "lanczos":
                raise self.refuse(pixels, "upscale_method", "the upscale model's image is resized with lanczos here")
            if self.workflow.class_of(pixels) == "ImageScale" and value(pixels, "crop") != "disabled":
                raise self.refuse(pixels, "crop", "the hires fix here does not crop")
            resize, (pixels, _) = pixels, self.source(pixels, "image", "ImageUpscaleWithModel")
        else:
            resize = None
        loader, _ = self.source(pixels, "upscale_model", "UpscaleModelLoader")
        upscaler = served_id(value(loader, "model_name"))
        decode, _ = self.source(pixels, "image", "VAEDecode")
        first, _ = self.source(decode, "samples", "KSampler")
        self.check_vae(decode)
        scale = float(self.served.upscaler_scale(upscaler))
        if resize is not None and self.workflow.class_of(resize) == "ImageScaleBy":
            size = {"scale": scale * value(resize, "scale_by")}
        elif resize is not None:
            size = {"width": value(resize, "width"), "height": value(resize, "height")}
        else:
            size = {"scale": scale}
        if size.get("scale", 0) > scale:
            raise self.refuse(resize or pixels, "scale_by", f"one pass of the upscale model here: at most x{scale:g}")
        self.second_pass(sampler, first, resize or pixels, {**size, "upscaler": upscaler})

    def second_pass(self, sampler: str, first: str, upscale: str, hires: dict[str, Any]) -> None:
        """A hires fix's second sampler, after `first`: the same settings, its own denoise and steps."""
        value = self.workflow.value
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
        self.set("hires_fix", HiresFix(**hires, strength=denoise, steps=value(sampler, "steps")), upscale, "image")
        self.set("steps", value(first, "steps"), first, "steps")  # (the first pass's; the second's are the fix's)

    def mask(self, node_id: str, name: str, grow: int) -> bytes:
        """A mask as the engine takes it (white repaints), from ComfyUI's MASK (1 repaints):
        LoadImage's is its alpha inverted, LoadImageMask's the channel it names."""
        source, _index = self.source(node_id, name, "LoadImage", "LoadImageMask")
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
                if spec.is_link and name in self.workflow.nodes[node_id]["inputs"]:
                    visit(self.workflow.link(node_id, name)[0])
            ordered.append(node_id)

        for output in self.workflow.outputs:
            visit(output)
        return ordered
