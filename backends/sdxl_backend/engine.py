"""A `GenerationRequest` becomes images, in two steps:

- `Engine.prepare()`, in the request's handler, before anything is queued: pick the model,
  decode the input image, fill in the model's defaults, validate everything against the
  limits, read the prompts into chunks (prompts.py), choose the seed. A bad request fails
  here, at once, and never waits in the queue.
- `Engine.generate()`, on the device thread: the prompts encoded (prompt_encoder.py), one
  pipeline call (with out-of-memory recovery), then encoding; `Engine.generate_batch()` runs
  compatible requests (`batch_key`) in one call.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from .controlnets import control_map
from .device_thread import TORCH_WORK
from .embeddings import EmbeddingSet
from .errors import BackendError, Cancelled, InvalidRequest, OutOfMemory
from .images import MEDIA_TYPES, decode_image, encode_image
from .limits import Limits
from .masks import fill_masked, prepare_mask
from .model_manager import ModelManager, ModelSource
from .modes import lower_mode
from .pipelines import with_controlnets
from .prompt_encoder import conditioning
from .prompts import PromptReader, PromptSyntax, ReadPrompts, model_tokenizers
from .protocol import (
    MAX_SEED,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ModelDefaults,
    PromptReading,
    Timings,
)
from .schedulers import SCHEDULERS, step_arguments

logger = logging.getLogger("sdxl_backend")
# What a ControlNet pipeline call takes beyond the plain one (the control maps aside).
CONTROL_ARGUMENTS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "guess_mode")


@dataclass(frozen=True)
class OutOfMemorySeam:
    """Test seam: the first `attempts` pipeline calls of every request raise CUDA's
    out-of-memory error at denoising step `step`, so CPU tests can drive the recovery path.
    Set by SDXL_TEST_FAULT_OOM ("ATTEMPTS" or "ATTEMPTS@STEP"); never set in production."""

    attempts: int
    step: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "OutOfMemorySeam | None":
        if not text:
            return None
        attempts, _, step = text.partition("@")
        return cls(int(attempts), int(step or 1))


# Called after each denoising step with (step, total steps, latents). It may raise to abandon
# the generation, or return True to end the denoising there and keep the image as it stands.
StepObserver = Callable[[int, int, "torch.Tensor | None"], "bool | None"]


@dataclass
class PreparedRequest:
    """A request that passed every check: every field filled in, the input image decoded at
    the output size. Only the device step is left."""

    request: GenerationRequest  # as it will run; its image bytes are dropped (decoded below)
    source: ModelSource
    init_image: Image.Image | None = field(default=None, repr=False)
    mask: Image.Image | None = field(default=None, repr=False)  # prepared: sized, inverted, blurred
    refiner: ModelSource | None = None  # the model that takes over at `request.refiner.switch_at`
    controls: list[Image.Image] = field(default_factory=list, repr=False)  # per ControlNet, at the output size
    prompts: ReadPrompts | None = field(default=None, repr=False)  # as the model reads them
    refiner_prompts: ReadPrompts | None = field(default=None, repr=False)  # as the refiner reads them

    @property
    def seeds(self) -> list[int]:
        return [self.request.seed + i for i in range(self.request.n)]

    @property
    def total_steps(self) -> int:
        """Denoising steps the pipelines will run (img2img runs `steps x strength`; a hires fix
        adds its second pass)."""
        if self.init_image is not None:
            return int(self.request.steps * self.request.strength)
        hires = self.request.hires_fix
        return self.request.steps + (int(hires.steps * hires.strength) if hires else 0)

    @property
    def output_size(self) -> tuple[int, int]:
        return output_size(self.request)


class BatchProgress:
    """Hands each step of a pipeline call to the observers of the requests in it, each with its
    own rows of the latents. A request whose observer raises `Cancelled` is dropped from then
    on; when none is left, the call is abandoned."""

    def __init__(self, batch: list[tuple[PreparedRequest, StepObserver | None]]):
        self.batch = batch
        self.dropped: dict[int, Cancelled] = {}
        ends = list(itertools.accumulate(prepared.request.n for prepared, _ in batch))
        self.rows = [slice(end - prepared.request.n, end) for (prepared, _), end in zip(batch, ends)]

    def step(self, step: int, total: int, latents: torch.Tensor | None) -> bool:
        """True: every request still in the call asks to end the denoising here."""
        stops = []
        for index, ((_, on_step), rows) in enumerate(zip(self.batch, self.rows)):
            if on_step is None or index in self.dropped:
                continue
            try:
                stops.append(bool(on_step(step, total, None if latents is None else latents[rows])))
            except Cancelled as exc:
                if len(self.dropped) + 1 == len(self.batch):
                    raise
                self.dropped[index] = exc
        return bool(stops) and all(stops)

    def split(self, pictures: list) -> list[list[Image.Image] | BackendError]:
        """The call's images, each request's own (a dropped one gets its `Cancelled`)."""
        return [self.dropped.get(index) or list(pictures[rows]) for index, rows in enumerate(self.rows)]


class Engine:
    """Turns requests into images. `prepare` runs on any thread; `generate` and
    `generate_batch` on the device thread only (device_thread.py says why).
    """

    def __init__(
        self,
        models: ModelManager,
        default_model: str,
        limits: Limits | None = None,
        oom_seam: OutOfMemorySeam | None = None,
        prompt_syntax: PromptSyntax = "a1111",
        embeddings: EmbeddingSet | None = None,  # the served textual-inversion embeddings
    ):
        self.models = models
        self.default_model = models.source(default_model).id
        self.limits = limits or Limits()
        self.oom_seam = oom_seam
        self.prompt_syntax = prompt_syntax
        self.embeddings = embeddings or EmbeddingSet()
        self._prompt_readers: dict[str, PromptReader] = {}

    def prompt_reader(self, source: ModelSource) -> PromptReader:
        """`source`'s tokenizers, the syntax setting and the embeddings that fit the model."""
        reader = self._prompt_readers.get(source.id)
        if reader is None:
            reader = self._prompt_readers.setdefault(source.id, PromptReader(
                lambda: model_tokenizers(source.path), self.prompt_syntax,
                self.embeddings.for_model(source.text_signature)))
        return reader

    def read_prompts(self, request: GenerationRequest, source: ModelSource) -> ReadPrompts:
        """The request's prompts as `source`'s tokenizers cut them (raises `InvalidRequest` for
        syntax the server does not run)."""
        return self.prompt_reader(source).read_pair(request.prompt, request.negative_prompt)

    def set_default_model(self, model_id: str) -> str:
        """The model a request without `model` gets from now on (an alias names its model)."""
        self.default_model = self.models.source(model_id).id
        logger.info("default model is now %s", self.default_model)
        return self.default_model

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Everything before the device: raises `BackendError`s naming the field at fault."""
        source = self.models.source(request.model or self.default_model)
        init_image = decode_image(request.image, self.limits) if request.image is not None else None
        request = resolve(request, source.id, source.defaults, init_image)
        validate(request, self.limits)
        if source.img2img_only and init_image is None:
            raise InvalidRequest(f"image: model '{source.id}' only does image-to-image: send an image", "image")
        self.models.check_loras(source, [lora.id for lora in request.loras])
        self.models.check_controlnets(source, [unit.id for unit in request.controlnets])
        refiner = self._refiner(request, source)
        controls = [control_map(decode_image(unit.image, self.limits, f"controlnets[{index}].image"), unit,
                                output_size(request)) for index, unit in enumerate(request.controlnets)]
        if init_image is not None and init_image.size != (request.width, request.height):
            init_image = init_image.resize((request.width, request.height), Image.Resampling.LANCZOS)
        mask = None
        if request.mask is not None:
            if init_image is None:
                raise InvalidRequest("mask: inpainting needs the image to paint into (`image`)", "mask")
            size = (request.width, request.height)
            mask = prepare_mask(decode_image(request.mask, self.limits, "mask", mode="L"), size, request.mask_blur,
                                request.mask_invert)
            if mask.getextrema()[1] == 0:
                raise InvalidRequest("mask: it is all black, so nothing would be repainted (white repaints)", "mask")
            if request.masked_content == "fill":
                init_image = fill_masked(init_image, mask)
        controlnets = [unit.model_copy(update={"image": b""}) for unit in request.controlnets]
        return PreparedRequest(request.model_copy(update={"image": None, "mask": None, "controlnets": controlnets}),
                               source, init_image, mask, refiner, controls, self.read_prompts(request, source),
                               self.read_prompts(request, refiner) if refiner else None)

    def _refiner(self, request: GenerationRequest, source: ModelSource) -> ModelSource | None:
        if request.refiner is None:
            return None
        refiner = self.models.source(request.refiner.model)
        if not refiner.img2img_only:
            raise InvalidRequest(f"refiner.model: '{refiner.id}' is not a refiner (an image-to-image-only model)",
                                 "refiner.model")
        if source.img2img_only:
            raise InvalidRequest(f"refiner: model '{source.id}' is a refiner itself", "refiner")
        for other in ("hires_fix", "mask"):
            if getattr(request, other) is not None:
                raise InvalidRequest(f"refiner: not with {other}", "refiner")
        return refiner

    def mode_of(self, request: GenerationRequest) -> str:
        """The memory mode a request runs in: its own, else the server's."""
        return request.vram_mode or self.models.policy.default_mode

    def batch_key(self, prepared: PreparedRequest) -> tuple | None:
        """Requests with equal keys can share one pipeline call (their prompts, negative prompts,
        seeds, input images, counts and encodings may differ); None: this one runs alone."""
        request = prepared.request
        if (prepared.mask is not None or request.hires_fix is not None or prepared.refiner is not None
                or prepared.controls):
            return None
        img2img = prepared.init_image is not None
        # The prompts' chunk count: a prompt padded with empty chunks would read otherwise.
        return (prepared.source.id, request.width, request.height, request.steps, request.scheduler,
                request.guidance_scale, request.eta, request.strength if img2img else None, img2img,
                prepared.prompts.chunk_count, self.mode_of(request),
                lora_weights(request))

    def generate(self, prepared: PreparedRequest, on_step: StepObserver | None = None) -> GenerationResult:
        """One request: its pipeline call, with out-of-memory recovery, then encoding."""
        request, source = prepared.request, prepared.source
        # Out of memory: free what the call held, then once more in the next lower mode.
        modes = [self.mode_of(request)]
        if lower_mode(modes[0]):
            modes.append(lower_mode(modes[0]))
        try:
            for attempt, mode in enumerate(modes):
                try:
                    (pictures,), timings = self._denoise([(prepared, on_step)], mode, attempt)
                    break
                except OutOfMemory:
                    logger.warning("out of memory generating with %s in mode %s", source.id, mode)
                    if attempt == len(modes) - 1:
                        # Nothing more to try: leave memory as it was before the request.
                        self.models.unload(self._models_of(prepared))
                        raise OutOfMemory(
                            f"out of memory on {self.models.placement.device} generating {request.n} image(s) of "
                            f"{request.width}x{request.height} with {source.id}; tried memory modes "
                            f"{', '.join(modes)}; try fewer or smaller images"
                        ) from None
        finally:
            if mode == "low":  # low mode frees the models after the request, also after a failure
                self.models.unload(self._models_of(prepared))
        if isinstance(pictures, BackendError):
            raise pictures
        return self._result(prepared, pictures, mode, modes[:attempt], timings, request.n)

    @staticmethod
    def _models_of(prepared: PreparedRequest) -> list[str]:
        """Every model a request loads: its own, its refiner's, its ControlNets'."""
        return [prepared.source.id, *([prepared.refiner.id] if prepared.refiner else []),
                *(unit.id for unit in prepared.request.controlnets)]

    def generate_batch(
        self, batch: list[tuple[PreparedRequest, StepObserver | None]]
    ) -> list[GenerationResult | BackendError]:
        """Requests of one `batch_key` in one pipeline call; each gets its result, or its error
        (a request whose observer raised `Cancelled` is dropped at that step, the others go on).
        Out of memory: each request is run alone instead, with the usual recovery."""
        TORCH_WORK.note("generate")
        if len(batch) == 1:
            prepared, on_step = batch[0]
            try:
                return [self.generate(prepared, on_step)]
            except BackendError as exc:
                return [exc]
        first = batch[0][0]
        mode = self.mode_of(first.request)
        try:
            outcomes, timings = self._denoise(batch, mode, 0)
        except Cancelled as last:  # every request of the call was cancelled, the last one now
            return [last] * len(batch)
        except OutOfMemory:
            logger.warning("out of memory generating a batch of %d requests with %s in mode %s; each runs alone",
                           len(batch), first.source.id, mode)
            return [outcome for member in batch for outcome in self.generate_batch([member])]
        finally:
            if mode == "low":
                self.models.unload([first.source.id])
        images = sum(prepared.request.n for prepared, _ in batch)
        return [pictures if isinstance(pictures, BackendError)
                else self._result(prepared, pictures, mode, [], timings, images)
                for (prepared, _), pictures in zip(batch, outcomes)]

    def _result(self, prepared: PreparedRequest, pictures: list[Image.Image], mode: str, out_of_memory_in: list[str],
                timings: Timings, batch_images: int) -> GenerationResult:
        request, init_image = prepared.request, prepared.init_image
        inpainting = prepared.mask is not None
        started = time.perf_counter()
        images = [
            GeneratedImage(
                data=encode_image(picture, request.output_format, request.quality,
                                  infotext(request, seed, init_image is not None, inpainting)),
                media_type=MEDIA_TYPES[request.output_format],
                seed=seed,
                width=picture.width,
                height=picture.height,
            )
            for picture, seed in zip(pictures, prepared.seeds)
        ]
        timings = timings.model_copy(update={"encode_s": time.perf_counter() - started})
        logger.info(
            "generated %d image(s) %dx%d with %s in mode %s, %d steps, %s, in a call of %d image(s): %.2f s",
            request.n, request.width, request.height, prepared.source.id, mode, request.steps,
            request.scheduler, batch_images, timings.inference_s,
        )
        return GenerationResult(
            model=prepared.source.id, images=images, request=request, timings=timings, batch_images=batch_images,
            vram_mode=mode, out_of_memory_in=out_of_memory_in, img2img=init_image is not None,
            inpainting=inpainting, prompt_reading={
                name: PromptReading(tokens=read.tokens, chunks=read.own_chunks)
                for name, read in (("prompt", prepared.prompts.prompt), ("negative_prompt", prepared.prompts.negative))},
        )

    def _denoise(
        self, batch: list[tuple[PreparedRequest, StepObserver | None]], mode: str, attempt: int
    ) -> tuple[list[list[Image.Image] | BackendError], Timings]:
        """One pipeline call for the batch (two with a hires fix, which runs alone); returns each
        request's images (or the `Cancelled` that dropped it) and the call's timings (load,
        LoRA load, inference). A device out-of-memory error comes out as `OutOfMemory`, with the call's memory
        freed. Every image has its own prompt row and CPU generator, so a request's pixels do
        not depend on what it shares the call with."""
        members = [prepared for prepared, _ in batch]
        first = members[0]
        request, source = first.request, first.source
        hires = request.hires_fix if first.init_image is None else None
        second_pass_steps = int(hires.steps * hires.strength) if hires else 0
        if first.refiner is not None:  # the refiner's share of the steps, counted on after the base's
            second_pass_steps = first.total_steps - round(first.total_steps * request.refiner.switch_at)

        def per_image(values: Callable[[PreparedRequest], object]) -> list:
            return [values(prepared) for prepared in members for _ in range(prepared.request.n)]

        def generators() -> list[torch.Generator]:
            # CPU generators: the same seed gives the same noise whatever the device.
            return [torch.Generator("cpu").manual_seed(seed) for prepared in members for seed in prepared.seeds]

        progress = BatchProgress(batch)
        arguments = dict(
            **step_arguments(request.scheduler, request.steps),
            guidance_scale=request.guidance_scale,
            generator=generators(),
            callback_on_step_end=self._step_callback(attempt, progress, 0, second_pass_steps),
        )
        if request.eta is not None:
            arguments.update(eta=request.eta)
        width, height = first.output_size
        task = "txt2img" if first.init_image is None else "img2img" if first.mask is None else "inpaint"
        controlnet_ids = [unit.id for unit in request.controlnets]
        with (self.models.use(source.id, mode, width * height) as (pipelines, load_s),
              self.models.use_controlnets(controlnet_ids) as (controlnets, controlnet_load_s)):
            lora_load_s = self.models.apply_loras(source.id, pipelines, request.loras)
            pipeline = with_controlnets(pipelines, task, controlnets) if controlnets else getattr(pipelines, task)
            # (after the LoRAs: those that touch the text encoders change the conditioning)
            arguments.update(self.models.out_of_memory_as_error(lambda: conditioning(
                pipeline, per_image(lambda prepared: prepared.prompts), pipelines.encoded_prompts,
                lora_weights(request), self.prompt_reader(source).embeddings), "out of memory"))
            if controlnets:
                arguments.update(control_arguments(first, "image" if task == "txt2img" else "control_image"))
            if task == "txt2img":
                arguments.update(width=request.width, height=request.height)
                if hires is not None:
                    arguments.update(output_type="latent" if hires.upscaler == "latent" else "pil")
            elif task == "img2img":
                arguments.update(image=per_image(lambda prepared: prepared.init_image), strength=request.strength)
            else:  # (alone: the crop path takes one image and one mask)
                arguments.update(image=first.init_image, mask_image=first.mask, strength=request.strength,
                                 width=request.width, height=request.height,
                                 padding_mask_crop=request.masked_area_padding if request.masked_area_only else None)
            pipeline.scheduler = pipelines.new_scheduler(request.scheduler, source.defaults.timestep_spacing)
            if first.refiner is not None:  # the base stops at switch_at and hands over its latents
                arguments.update(denoising_end=request.refiner.switch_at, output_type="latent")
            started, refiner_load_s = time.perf_counter(), 0.0
            pictures = self.models.out_of_memory_as_error(lambda: pipeline(**arguments).images, "out of memory")
            if first.refiner is not None:
                pictures, refiner_load_s = self._refine(first, pictures, {**arguments, "generator": generators()},
                                                        mode, attempt, progress, pipeline.num_timesteps)
            if first.mask is not None and not request.masked_area_only:  # (the crop path pastes back by itself)
                pictures = [pipeline.image_processor.apply_overlay(first.mask, first.init_image, picture)
                            for picture in pictures]
            if hires is not None:
                # The second pass: the first pass's latents (or images) upscaled, repainted as img2img.
                # (An interrupt in the first pass also ends this one after its first step.)
                if hires.upscaler == "latent":
                    upscaled = torch.nn.functional.interpolate(pictures, size=(height // 8, width // 8), mode="bilinear")
                else:
                    upscaled = [picture.resize((width, height), Image.Resampling.LANCZOS) for picture in pictures]
                second = with_controlnets(pipelines, "img2img", controlnets) if controlnets else pipelines.img2img
                if controlnets:  # the control maps were made at this size: the first pass had them scaled down
                    arguments = {**arguments, **control_arguments(first, "control_image")}
                second.scheduler = pipelines.new_scheduler(request.scheduler, source.defaults.timestep_spacing)
                arguments = {**arguments, **step_arguments(request.scheduler, hires.steps),
                             "image": upscaled, "strength": hires.strength, "output_type": "pil",
                             "generator": generators(),
                             "callback_on_step_end": self._step_callback(attempt, progress, pipeline.num_timesteps, 0)}
                for first_pass_only in ("width", "height"):
                    arguments.pop(first_pass_only)
                pictures = self.models.out_of_memory_as_error(lambda: second(**arguments).images, "out of memory")
            # (a refiner loaded on the way counts as load time, not inference)
            timings = Timings(load_s=load_s + controlnet_load_s + refiner_load_s, lora_load_s=lora_load_s,
                              inference_s=time.perf_counter() - started - refiner_load_s, encode_s=0.0)
            return progress.split(pictures), timings

    def _refine(self, prepared: PreparedRequest, latents: torch.Tensor, arguments: dict, mode: str, attempt: int,
                progress: BatchProgress, steps_run: int) -> tuple[list[Image.Image], float]:
        """The refiner's part: the base's latents denoised from `switch_at` on (diffusers'
        ensemble of experts: no decoding in between), with `arguments` as the base ran (fresh
        generators in them); returns the images and the refiner's load seconds."""
        request, refiner = prepared.request, prepared.refiner
        width, height = prepared.output_size
        with self.models.use(refiner.id, mode, width * height) as (pipelines, load_s):
            pipeline = pipelines.img2img
            pipeline.scheduler = pipelines.new_scheduler(request.scheduler, refiner.defaults.timestep_spacing)
            refined = self.models.out_of_memory_as_error(lambda: conditioning(
                pipeline, [prepared.refiner_prompts] * request.n, pipelines.encoded_prompts,
                embeddings=self.prompt_reader(refiner).embeddings), "out of memory")
            arguments = {**arguments, "image": latents, "denoising_start": request.refiner.switch_at,
                         "output_type": "pil", **refined,
                         "callback_on_step_end": self._step_callback(attempt, progress, steps_run, 0)}
            for base_only in ("width", "height", "denoising_end", "strength", *CONTROL_ARGUMENTS):
                arguments.pop(base_only, None)
            pictures = self.models.out_of_memory_as_error(lambda: pipeline(**arguments).images, "out of memory")
        return pictures, load_s

    def _step_callback(self, attempt: int, progress: BatchProgress, offset: int, after: int) -> Callable:
        """Reports the steps of one pipeline call, counted on from `offset` steps run before it,
        with `after` more planned (a hires fix's two passes read as one run)."""
        seam = self.oom_seam

        def on_step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
            if seam is not None and attempt < seam.attempts and step + 1 >= seam.step:
                raise torch.OutOfMemoryError("CUDA out of memory (SDXL_TEST_FAULT_OOM test seam)")
            total = offset + pipeline.num_timesteps + after
            if progress.step(offset + step + 1, total, tensors.get("latents")):
                pipeline._interrupt = True  # diffusers' documented way: skip the remaining steps, then decode
            return tensors

        return on_step_end


def lora_weights(request: GenerationRequest) -> tuple[tuple[str, float], ...]:
    return tuple((lora.id, lora.weight) for lora in request.loras)


def output_size(request: GenerationRequest) -> tuple[int, int]:
    """The size of the images a resolved request makes: its own, or its hires fix's."""
    hires = request.hires_fix
    return (hires.width, hires.height) if hires else (request.width, request.height)


def control_arguments(prepared: PreparedRequest, maps_argument: str) -> dict:
    """The ControlNet arguments of a pipeline call; the maps go in `maps_argument` ("image" in
    text-to-image, where `image` is not taken, else "control_image"). diffusers takes plain
    values for one ControlNet and lists for several."""
    units = prepared.request.controlnets

    def each(values: list) -> list | object:
        return values if len(units) > 1 else values[0]

    return {maps_argument: each(prepared.controls),
            "controlnet_conditioning_scale": each([unit.scale for unit in units]),
            "control_guidance_start": each([unit.start for unit in units]),
            "control_guidance_end": each([unit.end for unit in units]),
            "guess_mode": units[0].guess_mode}


def resolve(
    request: GenerationRequest, model_id: str, defaults: ModelDefaults, init_image: Image.Image | None
) -> GenerationRequest:
    """The request with every open field filled: the model's defaults, or for img2img the
    input image's size (rounded down to a multiple of 8), and a random seed."""
    width, height = defaults.width, defaults.height
    if init_image is not None:
        width, height = init_image.width // 8 * 8, init_image.height // 8 * 8
    filled = {
        "model": model_id,
        "width": width if request.width is None else request.width,
        "height": height if request.height is None else request.height,
        "steps": defaults.steps if request.steps is None else request.steps,
        "guidance_scale": defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        "scheduler": request.scheduler or defaults.scheduler,
        "seed": secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
    }
    if request.hires_fix is not None:
        hires = request.hires_fix
        filled["hires_fix"] = hires.model_copy(update={
            "width": hires.width or int(filled["width"] * hires.scale) // 8 * 8,
            "height": hires.height or int(filled["height"] * hires.scale) // 8 * 8,
            "steps": hires.steps or filled["steps"],
        })
    return request.model_copy(update=filled)


def check_size(width: int, height: int, limits: Limits, prefix: str = "") -> None:
    for name, value in ((f"{prefix}width", width), (f"{prefix}height", height)):
        if value % 8:
            raise InvalidRequest(f"{name}: {value} is not a multiple of 8", name)
        if not limits.min_side <= value <= limits.max_side:
            raise InvalidRequest(f"{name}: {value} is outside {limits.min_side}..{limits.max_side}", name)
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"{prefix}width x {prefix}height: {width}x{height} is over the limit of {limits.max_pixels} pixels",
            f"{prefix}width",
        )


def validate(request: GenerationRequest, limits: Limits) -> None:
    """Every check that does not need the model, with the field named in the message."""
    if not request.prompt and request.image is None:
        raise InvalidRequest("prompt: required (only a variation of an input image may go without one)", "prompt")
    check_size(request.width, request.height, limits)
    if request.steps > limits.max_steps:
        raise InvalidRequest(f"steps: {request.steps} is over the limit of {limits.max_steps}", "steps")
    if request.guidance_scale > limits.max_guidance_scale:
        raise InvalidRequest(
            f"guidance_scale: {request.guidance_scale} is over the limit of {limits.max_guidance_scale}",
            "guidance_scale",
        )
    if request.n > limits.max_images:
        raise InvalidRequest(f"n: {request.n} is over the limit of {limits.max_images} images", "n")
    for name in ("prompt", "negative_prompt"):
        length = len(getattr(request, name))
        if length > limits.max_prompt_chars:
            raise InvalidRequest(
                f"{name}: {length} characters is over the limit of {limits.max_prompt_chars}", name
            )
    if request.scheduler not in SCHEDULERS:
        raise InvalidRequest(
            f"scheduler: unknown scheduler '{request.scheduler}'; known: {', '.join(SCHEDULERS)}", "scheduler"
        )
    if request.eta is not None and request.scheduler != "ddim":
        raise InvalidRequest(f"eta: only the ddim scheduler takes eta, not {request.scheduler}", "eta")
    if request.image is not None and int(request.steps * request.strength) < 1:  # before the image is dropped
        raise InvalidRequest(
            f"strength: {request.strength} x {request.steps} steps leaves no step to run; raise either",
            "strength",
        )
    for index, unit in enumerate(request.controlnets):
        if unit.end <= unit.start:
            raise InvalidRequest(f"controlnets[{index}].end: {unit.end} is not after start ({unit.start})",
                                 f"controlnets[{index}].end")
        if unit.guess_mode != request.controlnets[0].guess_mode:
            raise InvalidRequest("controlnets: guess_mode applies to the whole generation; give every unit the same",
                                 f"controlnets[{index}].guess_mode")
        if unit.preprocess == "canny" and unit.low_threshold > unit.high_threshold:
            raise InvalidRequest(f"controlnets[{index}].low_threshold: {unit.low_threshold} is above high_threshold "
                                 f"({unit.high_threshold})", f"controlnets[{index}].low_threshold")
    if request.controlnets and request.refiner is not None and request.image is not None:
        raise InvalidRequest("controlnets: with a refiner, text-to-image only (diffusers' ControlNet image-to-image "
                             "cannot hand over to a refiner)", "controlnets")
    hires = request.hires_fix
    if hires is not None:
        if request.image is not None:
            raise InvalidRequest("hires_fix: txt2img only (an img2img request sets its size from its image)",
                                 "hires_fix")
        check_size(hires.width, hires.height, limits, "hires_fix.")
        if hires.width < request.width or hires.height < request.height:
            raise InvalidRequest(f"hires_fix: {hires.width}x{hires.height} is smaller than the first pass's "
                                 f"{request.width}x{request.height}", "hires_fix")
        if hires.steps > limits.max_steps:
            raise InvalidRequest(f"hires_fix.steps: {hires.steps} is over the limit of {limits.max_steps}",
                                 "hires_fix.steps")
        if int(hires.steps * hires.strength) < 1:
            raise InvalidRequest(f"hires_fix.strength: {hires.strength} x {hires.steps} steps leaves no step to run",
                                 "hires_fix.strength")


def infotext(request: GenerationRequest, seed: int, img2img: bool, inpainting: bool) -> str:
    """The generation parameters in AUTOMATIC1111's format, which image tools parse."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = [
        f"Steps: {request.steps}",
        f"Sampler: {SCHEDULERS[request.scheduler].label}",
        f"CFG scale: {request.guidance_scale}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {request.model}",
    ]
    if img2img:
        settings.append(f"Denoising strength: {request.strength}")
    if request.hires_fix and not img2img:
        hires = request.hires_fix
        settings.append(f"Hires resize: {hires.width}x{hires.height}, Hires steps: {hires.steps}, "
                        f"Hires upscaler: {hires.upscaler.title()}, Denoising strength: {hires.strength}")
    if request.refiner:
        settings.append(f"Refiner: {request.refiner.model}, Refiner switch at: {request.refiner.switch_at}")
    for index, unit in enumerate(request.controlnets):  # as A1111's ControlNet extension writes them
        settings.append(f'ControlNet {index}: "Module: {unit.preprocess}, Model: {unit.id}, Weight: {unit.scale}, '
                        f'Guidance Start: {unit.start}, Guidance End: {unit.end}"')
    if inpainting:
        settings.append(f"Mask blur: {request.mask_blur}")
        if request.masked_area_only:
            settings.append(f"Inpaint area: Only masked, Masked area padding: {request.masked_area_padding}")
    lines.append(", ".join(settings))
    return "\n".join(lines)
