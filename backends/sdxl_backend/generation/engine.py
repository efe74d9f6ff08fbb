"""A `GenerationRequest` becomes images, in two steps:

- `Engine.prepare()`, in the request's handler, before anything is queued: pick the model,
  decode the input image, fill in the model's defaults, validate everything against the
  limits, read the prompts into chunks (prompts/reader.py), choose the seed. A bad request fails
  here, at once, and never waits in the queue.
- `Engine.generate()`, on the device thread: the prompts encoded (prompts/encoder.py), one
  pipeline call (denoise.py), with out-of-memory recovery, then encoding;
  `Engine.generate_batch()` runs compatible requests (`batch_key`) in one call.
"""

from __future__ import annotations

import logging
import time

from PIL import Image

from backends.sdxl_backend.device_thread import TORCH_WORK
from backends.sdxl_backend.errors import BackendError, Cancelled, InvalidRequest, OutOfMemory
from backends.sdxl_backend.generation import infotext
from backends.sdxl_backend.generation.denoise import Denoiser, OutOfMemorySeam, lora_weights
from backends.sdxl_backend.generation.images import MEDIA_TYPES, decode_image, encode_image
from backends.sdxl_backend.generation.masks import fill_masked, prepare_mask
from backends.sdxl_backend.generation.prepared import PreparedRequest
from backends.sdxl_backend.generation.progress import Batch, StepObserver
from backends.sdxl_backend.generation.upscaling import PreparedUpscale, Upscaling
from backends.sdxl_backend.generation.validation import (
    check_controlnets,
    check_ip_adapters,
    check_loras,
    check_upscaler,
    first_pass_size,
    outpaint,
    output_size,
    resolve,
    sampling_profile,
    validate,
)
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.controlnets import control_map
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.modes import lower_mode
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.models.schedulers import SCHEDULERS
from backends.sdxl_backend.models.upscalers import Tiling
from backends.sdxl_backend.prompts.embeddings import EmbeddingSet
from backends.sdxl_backend.prompts.reader import PromptReader, PromptSyntax, ReadPrompts, model_tokenizers
from backends.sdxl_backend.protocol import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    PromptReading,
    ResolvedRequest,
    Timings,
)
from backends.sdxl_backend.upscale_protocol import UpscaleResult

logger = logging.getLogger(__name__)
IMAGED = ("controlnets", "ip_adapters")  # a request's units that bring a picture each


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
        tiling: Tiling = Tiling(),  # how upscale models cut large pictures
    ):
        self.models = models
        self.default_model = models.source(default_model).id
        self.limits = limits or Limits()
        self.denoise = Denoiser(models, self.prompt_reader, oom_seam, tiling)  # the device's part of a call
        self.upscaling = Upscaling(models, self.limits, tiling)  # /v1/upscale, A1111's extras
        self.prompt_syntax = prompt_syntax
        self.embeddings = embeddings or EmbeddingSet()
        self._prompt_readers: dict[str, PromptReader] = {}

    def prompt_reader(self, source: ModelSource) -> PromptReader:
        """`source`'s tokenizers, the syntax setting and the embeddings that fit the model."""
        reader = self._prompt_readers.get(source.id)
        if reader is None:
            reader = self._prompt_readers.setdefault(
                source.id,
                PromptReader(
                    lambda: model_tokenizers(source.path),
                    self.prompt_syntax,
                    self.embeddings.for_model(source.text_signature),
                ),
            )
        return reader

    def read_prompts(self, request: ResolvedRequest, source: ModelSource) -> ReadPrompts:
        """The request's prompts as `source`'s tokenizers cut them (raises `InvalidRequest` for
        syntax the server does not run, and for a prompt of more chunks than the limit: every
        chunk is encoded, and attended to at every step)."""
        read = self.prompt_reader(source).read_scheduled(
            request.prompt, request.negative_prompt, request.steps, request.prompt_style
        )
        for entry in [read, *(scheduled for _, scheduled in read.schedule)]:
            for field, prompt in (("prompt", entry.prompt), ("negative_prompt", entry.negative)):
                if prompt.own_chunks > self.limits.max_prompt_chunks:
                    raise InvalidRequest(
                        f"{field}: {prompt.own_chunks} chunks of 75 tokens (a BREAK starts a new one) is over the "
                        f"limit of {self.limits.max_prompt_chunks} (SDXL_MAX_PROMPT_CHUNKS)",
                        field,
                    )
        if read.schedule:
            for other in ("hires_fix", "refiner", "controlnets", "pag_scale"):
                if getattr(request, other):
                    raise InvalidRequest(
                        f"prompt: prompt editing and alternation ([a:b:when], [a|b]) do not run with {other} here",
                        "prompt",
                    )
        return read

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Everything before the device: raises `BackendError`s naming the field at fault."""
        source = self.models.source(request.model or self.default_model)
        init_image = decode_image(request.image, self.limits) if request.image is not None else None
        new_area = None  # outpainting's: the margins to paint
        if request.outpaint is not None:
            request, init_image, new_area = outpaint(request, init_image)
        request = resolve(request, source.id, source.defaults, init_image, sampling_profile(self.models, request))
        validate(request, self.limits)
        size = first_pass_size(request)
        if source.img2img_only and init_image is None:
            raise InvalidRequest(f"image: model '{source.id}' only does image-to-image: send an image", "image")
        if request.clip_skip > source.text_layers:
            raise InvalidRequest(
                f"clip_skip: {request.clip_skip} is past the first layer: model '{source.id}' has "
                f"{source.text_layers} in its smaller text encoder",
                "clip_skip",
            )
        if source.sampling.zero_snr and not SCHEDULERS[request.scheduler].zero_snr:
            raise InvalidRequest(
                f"scheduler: {request.scheduler} cannot run model '{source.id}', trained with zero-terminal SNR; "
                f"these can: {', '.join(name for name, spec in SCHEDULERS.items() if spec.zero_snr)}",
                "scheduler",
            )
        check_loras(self.models, source, [lora.id for lora in request.loras])
        check_controlnets(self.models, source, request.controlnets)
        check_ip_adapters(self.models, source, [unit.id for unit in request.ip_adapters])
        if request.hires_fix is not None and request.hires_fix.upscaler != "latent":
            check_upscaler(self.models, "hires_fix.upscaler", request.hires_fix.upscaler, size, output_size(request))
        refiner = self._refiner(request, source)
        controls = [
            control_map(
                decode_image(unit.image, self.limits, f"controlnets[{index}].image"), unit, output_size(request)
            )
            for index, unit in enumerate(request.controlnets)
        ]
        image_prompts = [
            decode_image(unit.image, self.limits, f"ip_adapters[{index}].image")
            for index, unit in enumerate(request.ip_adapters)
        ]
        if init_image is not None and init_image.size != size:
            init_image = init_image.resize(size, Image.Resampling.LANCZOS)
        mask = None
        if request.mask is not None:
            if init_image is None:
                raise InvalidRequest("mask: inpainting needs the image to paint into (`image`)", "mask")
            mask = prepare_mask(
                decode_image(request.mask, self.limits, "mask", mode="L"), size, request.mask_blur, request.mask_invert
            )
            if mask.getextrema()[1] == 0:
                raise InvalidRequest("mask: it is all black, so nothing would be repainted (white repaints)", "mask")
            if request.masked_content == "fill":
                init_image = fill_masked(init_image, mask)
        elif new_area is not None:
            mask = prepare_mask(new_area, size, request.mask_blur, False)
        # The queued request holds the decoded pictures beside it, not the uploads.
        units = {name: [unit.model_copy(update={"image": b""}) for unit in getattr(request, name)] for name in IMAGED}
        return PreparedRequest(
            request.model_copy(update={"image": None, "mask": None, **units}),
            source,
            self.read_prompts(request, source),
            init_image=init_image,
            mask=mask,
            refiner=refiner,
            controls=controls,
            image_prompts=image_prompts,
            refiner_prompts=self.read_prompts(request, refiner) if refiner else None,
        )

    def _refiner(self, request: ResolvedRequest, source: ModelSource) -> ModelSource | None:
        if request.refiner is None:
            return None
        refiner = self.models.source(request.refiner.model)
        if not refiner.img2img_only:
            raise InvalidRequest(
                f"refiner.model: '{refiner.id}' is not a refiner (an image-to-image-only model)", "refiner.model"
            )
        if source.img2img_only:
            raise InvalidRequest(f"refiner: model '{source.id}' is a refiner itself", "refiner")
        for other in ("hires_fix", "mask"):
            if getattr(request, other) is not None:
                raise InvalidRequest(f"refiner: not with {other}", "refiner")
        return refiner

    def mode_of(self, request: GenerationRequest) -> str:
        """The memory mode a request runs in: its own, else the server's."""
        return request.vram_mode or self.models.policy.default_mode

    def batch_key(self, prepared: PreparedRequest | PreparedUpscale) -> tuple | None:
        """Requests with equal keys can share one pipeline call (their prompts, negative prompts,
        seeds, input images, counts and encodings may differ); None: this one runs alone (an
        upscale always does)."""
        if isinstance(prepared, PreparedUpscale):
            return None
        request = prepared.request
        if (
            prepared.mask is not None
            or request.hires_fix is not None
            or prepared.refiner is not None
            or prepared.controls
            or prepared.prompts.schedule  # (its conditioning changes between steps)
        ):
            return None
        img2img = prepared.init_image is not None
        # The prompts' chunk count: a prompt padded with empty chunks would read otherwise.
        return (
            prepared.source.id,
            request.width,
            request.height,
            request.steps,
            request.scheduler,
            request.guidance_scale,
            request.eta,
            request.clip_skip,
            request.guidance_rescale,
            request.pag_scale,
            request.freeu,
            request.strength if img2img else None,
            img2img,
            prepared.prompts.chunk_count,
            self.mode_of(request),
            lora_weights(request),
            # The image prompts: installed in the UNet per call, one picture each for the whole call.
            tuple(
                (unit.id, unit.scale, picture)
                for unit, picture in zip(request.ip_adapters, prepared.image_prompt_digests)
            ),
        )

    def generate(self, prepared: PreparedRequest, on_step: StepObserver | None = None) -> GenerationResult:
        """One request: its pipeline call, with out-of-memory recovery, then encoding."""
        request, source = prepared.request, prepared.source
        # Out of memory: free what the call held, then once more in the next lower mode.
        modes = [self.mode_of(request)]
        if lower := lower_mode(modes[0]):
            modes.append(lower)
        try:
            for attempt, mode in enumerate(modes):
                try:
                    (pictures,), timings = self.denoise([(prepared, on_step)], mode, attempt)
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
        """Every model a request loads: its own, its refiner's, its ControlNets' and IP-Adapters'."""
        return [
            prepared.source.id,
            *([prepared.refiner.id] if prepared.refiner else []),
            *(unit.id for unit in prepared.request.controlnets),
            *(unit.id for unit in prepared.request.ip_adapters),
        ]

    def run_batch(
        self, batch: list[tuple[PreparedRequest | PreparedUpscale, StepObserver]]
    ) -> list[GenerationResult | UpscaleResult | BackendError]:
        """A batch the queue took (the device worker's call): an upscale, alone, or generations
        of one `batch_key`, each with its outcome."""
        (first, on_step), *_ = batch
        if isinstance(first, PreparedUpscale):
            try:
                return [self.upscaling.run(first, on_step)]
            except BackendError as exc:
                return [exc]
        return [*self.generate_batch([(p, observer) for p, observer in batch if isinstance(p, PreparedRequest)])]

    def generate_batch(self, batch: Batch) -> list[GenerationResult | BackendError]:
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
            outcomes, timings = self.denoise(batch, mode, 0)
        except Cancelled as last:  # every request of the call was cancelled, the last one now
            return [last] * len(batch)
        except OutOfMemory:
            logger.warning(
                "out of memory generating a batch of %d requests with %s in mode %s; each runs alone",
                len(batch),
                first.source.id,
                mode,
            )
            return [outcome for member in batch for outcome in self.generate_batch([member])]
        finally:
            if mode == "low":
                self.models.unload([first.source.id])
        images = sum(prepared.request.n for prepared, _ in batch)
        return [
            pictures
            if isinstance(pictures, BackendError)
            else self._result(prepared, pictures, mode, [], timings, images)
            for (prepared, _), pictures in zip(batch, outcomes)
        ]

    def _result(
        self,
        prepared: PreparedRequest,
        pictures: list[Image.Image],
        mode: str,
        out_of_memory_in: list[str],
        timings: Timings,
        batch_images: int,
    ) -> GenerationResult:
        request, init_image = prepared.request, prepared.init_image
        inpainting = prepared.mask is not None
        started = time.perf_counter()
        images = [
            GeneratedImage(
                data=encode_image(
                    picture,
                    request.output_format,
                    request.quality,
                    infotext.write(request, seed, init_image is not None, inpainting),
                ),
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
            request.n,
            request.width,
            request.height,
            prepared.source.id,
            mode,
            request.steps,
            request.scheduler,
            batch_images,
            timings.inference_s,
        )
        return GenerationResult(
            model=prepared.source.id,
            images=images,
            request=request,
            timings=timings,
            batch_images=batch_images,
            vram_mode=mode,
            out_of_memory_in=out_of_memory_in,
            img2img=init_image is not None,
            inpainting=inpainting,
            prompt_reading={
                name: PromptReading(tokens=read.tokens, chunks=read.own_chunks)
                for name, read in (("prompt", prepared.prompts.prompt), ("negative_prompt", prepared.prompts.negative))
            },
        )
