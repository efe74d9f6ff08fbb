"""The SDXL service: BentoML wiring.

Where a request goes: the native API enters at the `@bentoml.api` methods below; the other
dialects (moondream-station, OpenAI Images, AUTOMATIC1111, jobs) at their routers in
backends/api/, mounted here as one FastAPI app. Each dialect turns its body into a
`GenerationRequest`; `Runtime.run()` (backends/api/composition/runtime.py) has it checked by
`Engine.prepare()`, queued, and run on the device thread by `Engine.generate()`
(backends/sdxl_backend/generation/engine.py); the dialect shapes the `GenerationResult` into its answer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import bentoml
import yaml
from bentoml._internal.server.http import traffic

from backends.api import agents
from backends.api.composition.app import create_app
from backends.api.composition.devices import placements_of
from backends.api.composition.runtime import Runtime
from backends.api.composition.served import ServedAdapter, ServedModel, SideModels
from backends.api.composition.settings import declared_environment, load_settings
from backends.api.edge import headers
from backends.api.edge.guards import Origins, listening_addresses, refuse_open_network
from backends.api.edge.middleware import Edge, TimelyTimeout, quiet_validation_logs
from backends.api.jobs import answers
from backends.api.native import generation as native
from backends.api.native import upscale as upscale_api
from backends.api.operations.logs import log_json_lines
from backends.api.operations.tracing import name_spans_by_route, tracing_config
from backends.sdxl_backend.models.loras import model_unet_signature
from backends.sdxl_backend.prompts.embeddings import fits_model, model_text_signature
from backends.sdxl_backend.protocol import GenerationRequest, ImageToImageRequest, TextToImageRequest
from backends.sdxl_backend.upscale_protocol import UpscaleRequest
from models.catalog import defaults_for, load_catalog
from models.store import stored_models

logger = logging.getLogger(__name__)
SETTINGS = load_settings()
ORIGINS = Origins(SETTINGS.cors_origins)
# Where `bentoml build` writes the bento's manifest, beside the directory this file is packed in.
BENTO_MANIFEST = Path(__file__).resolve().parent.parent / "bento.yaml"


def packed_models(kind: str) -> dict[str, bentoml.Model] | None:
    """The models of `kind` a built bento packed; None when serving from source."""
    if not BENTO_MANIFEST.is_file():
        return None
    manifest = yaml.safe_load(BENTO_MANIFEST.read_text())
    tags = [m["tag"] for m in manifest.get("models", [])]
    tags += [m["tag"] for service in manifest.get("services", []) for m in service.get("models", [])]
    packed = [bentoml.models.get(tag) for tag in tags]
    return {
        model.info.labels["sdxl_id"]: model
        for model in packed
        if "sdxl_id" in model.info.labels and model.info.labels.get("sdxl_kind", "pipeline") == kind
    }


def served_models() -> dict[str, bentoml.Model]:
    """A built bento serves exactly the models it packed; from source, `SDXL_MODELS` or every
    SDXL model in the store."""
    packed = packed_models("pipeline")
    if packed is not None:
        return packed
    stored = stored_models()
    missing = [m for m in SETTINGS.models if m not in stored]
    if missing:
        raise RuntimeError(
            f"SDXL_MODELS names {', '.join(missing)}, not in the model store; "
            f"import with `python -m models import ID` (stored: {', '.join(stored) or 'none'})"
        )
    if not stored:
        raise RuntimeError(
            "the model store holds no SDXL model: run `python -m models import tiny-sdxl` (or sdxl-base)"
        )
    return {m: stored[m] for m in SETTINGS.models} if SETTINGS.models else stored


def replacement_vae() -> bentoml.Model | None:
    """The stored VAE that `SDXL_VAE` names, used in place of each served model's own."""
    if SETTINGS.vae is None:
        return None
    stored = packed_models("vae")
    stored = stored_models("vae") if stored is None else stored
    if SETTINGS.vae not in stored:
        raise RuntimeError(
            f"SDXL_VAE={SETTINGS.vae} is not a VAE in the model store; import it with "
            f"`python -m models import {SETTINGS.vae}` (stored VAEs: {', '.join(stored) or 'none'})"
        )
    return stored[SETTINGS.vae]


def served_adapters(kind: str) -> dict[str, bentoml.Model]:
    """The LoRAs (ControlNets, embeddings, IP-Adapters, upscalers) in the store that fit a served model, so that a bento
    packs none it could never use; in a bento, every one it packed. Requests pick among them."""
    packed = packed_models(kind)
    if packed is not None:
        return packed
    if kind == "upscaler":  # (they fit every model)
        return stored_models(kind)
    if kind == "embedding":  # (made for text encoders of given widths)
        widths = {model_text_signature(Path(model.path)) for model in SERVED.values()}
        return {
            embedding_id: embedding
            for embedding_id, embedding in stored_models(kind).items()
            if any(fits_model(embedding.info.labels["fits"], model) for model in widths)
        }
    architectures = {model_unet_signature(Path(model.path)) for model in SERVED.values()}
    return {
        adapter_id: adapter
        for adapter_id, adapter in stored_models(kind).items()
        if adapter.info.labels["fits"] in architectures
    }


def default_model(served: list[str]) -> str:
    """`SDXL_DEFAULT_MODEL`, else the first served model in catalog order."""
    if SETTINGS.default_model:
        if SETTINGS.default_model not in served:
            raise RuntimeError(
                f"SDXL_DEFAULT_MODEL={SETTINGS.default_model} is not served (served: {', '.join(served)})"
            )
        return SETTINGS.default_model
    order = list(load_catalog())
    return min(served, key=lambda m: order.index(m) if m in order else len(order))


def model_attribute(model_id: str, kind: str = "model") -> str:
    return f"{kind}_".replace("-", "_") + model_id.replace("-", "_").replace(".", "_")


if SETTINGS.device not in ("auto", "cpu") or SETTINGS.devices:
    placements_of(SETTINGS)  # a device named that is not there stops the start here, naming its setting
SERVED = served_models()
DEFAULT_MODEL = default_model(list(SERVED))
refuse_open_network(listening_addresses(), SETTINGS.api_keys, SETTINGS.allow_open)
if SETTINGS.openai_model and SETTINGS.openai_model not in [*SERVED, *SETTINGS.model_aliases]:
    raise RuntimeError(f"SDXL_OPENAI_MODEL={SETTINGS.openai_model} is not served (served: {', '.join(SERVED)})")
VAE = replacement_vae()
VAE_ATTRIBUTE = "model_vae"  # (the class attribute that holds it, like the models')
ADAPTERS = {kind: served_adapters(kind) for kind in ("lora", "controlnet", "embedding", "ip-adapter", "upscaler")}
dialects = create_app()


class SDXL:
    def __init__(self) -> None:
        for name in ("backends", __name__):  # the house's loggers, named by module: INFO where BentoML's go
            logging.getLogger(name).setLevel(logging.INFO)
        quiet_validation_logs()
        agents.preload()  # (while the models load)
        if SETTINGS.log_format == "json":
            log_json_lines()
        catalog = load_catalog()
        served = [
            ServedModel(
                model_id,
                Path(getattr(self, model_attribute(model_id)).path),
                model.tag.version or "",  # (a stored model's tag has its version)
                catalog[model_id].description if model_id in catalog else "",
                defaults_for(model_id),
            )
            for model_id, model in SERVED.items()
        ]
        vae = Path(getattr(self, VAE_ATTRIBUTE).path) if VAE is not None else None
        sides = SideModels(
            *(
                [
                    ServedAdapter(
                        adapter_id,
                        Path(getattr(self, model_attribute(adapter_id, kind)).path),
                        adapter.info.labels.get("fits", "any"),
                        catalog[adapter_id].description if adapter_id in catalog else adapter.info.labels["source"],
                        catalog[adapter_id].sampling if adapter_id in catalog else None,
                    )
                    for adapter_id, adapter in adapters.items()
                ]
                for kind, adapters in ADAPTERS.items()  # (in SideModels' order)
            )
        )
        self.runtime = Runtime(SETTINGS, served, DEFAULT_MODEL, vae, sides)
        dialects.state.runtime = self.runtime
        name_spans_by_route(dialects)
        self.runtime.start(warm_up=SETTINGS.warmup)

    @bentoml.api(route="/v1/txt2img", input_spec=TextToImageRequest)
    async def txt2img(self, ctx: bentoml.Context, **fields: Any) -> answers.GenerationAnswer:
        """Text to image. JSON with the images (base64), seeds and timings; with
        `Accept: image/png` (or jpeg/webp) and n=1, the image itself."""
        # (The annotation is the JSON answer's schema for BentoML; the image itself is a Response.)
        return await native.answer(self.runtime, GenerationRequest(**fields), ctx)  # type: ignore[return-value]

    @bentoml.api(route="/v1/img2img", input_spec=ImageToImageRequest)
    async def img2img(self, ctx: bentoml.Context, **fields: Any) -> answers.GenerationAnswer:
        """Image to image: `image` (base64) repainted by `strength`. Answers as txt2img."""
        return await native.answer(self.runtime, GenerationRequest(**fields), ctx)  # type: ignore[return-value]

    @bentoml.api(route="/v1/upscale", input_spec=UpscaleRequest)
    async def upscale(self, ctx: bentoml.Context, **fields: Any) -> answers.UpscaleAnswer:
        """`image` made larger by an upscale model (GET /v1/upscalers) or resized (lanczos):
        by `scale`, or to `width`/`height`. JSON with the image, or the image itself with
        `Accept: image/png`."""
        return await upscale_api.answer(self.runtime, UpscaleRequest(**fields), ctx)  # type: ignore[return-value]

    def __is_alive__(self) -> bool:
        """/livez and /readyz answer 503 once the device thread is gone, so the pod restarts."""
        return self.runtime.alive

    def __is_ready__(self) -> bool:
        return self.runtime.alive

    @bentoml.on_shutdown
    def close(self) -> None:
        self.runtime.close()


# BentoML finds the models a service uses among its class attributes, and `bentoml build` packs
# those. The served set is known only now, so the attributes are set before the class becomes
# a service (which is why the decorators are applied by hand).
for _model_id, _model in SERVED.items():
    setattr(SDXL, model_attribute(_model_id), bentoml.models.BentoModel(_model.tag))
for _kind, _adapters in ADAPTERS.items():
    for _adapter_id, _adapter in _adapters.items():
        setattr(SDXL, model_attribute(_adapter_id, _kind), bentoml.models.BentoModel(_adapter.tag))
if VAE is not None:
    setattr(SDXL, VAE_ATTRIBUTE, bentoml.models.BentoModel(VAE.tag))
# (The class's name becomes the service's: `service:SDXL`, as bentofile.yaml and clients name it.)
SDXL = bentoml.service(  # type: ignore[misc]
    name="sdxl",
    # The image `bentoml containerize` builds: no distro packages (no compiler or git left in
    # it: every dependency is a wheel), the pinned requirements, CUDA-enabled torch from PyPI.
    image=bentoml.images.Image(base_image="python:3.11-slim", distro="none", python_version="3.11").requirements_file(
        "requirements.txt"
    ),
    envs=[{"name": name, "value": value} for name, value in declared_environment().items()],
    resources={"gpu": 1},
    workers=1,
    # The service ends a request at SDXL_TIMEOUT_SECONDS itself (cancelling its job, answering
    # 504 in the error shape); BentoML's own timeout is the backstop behind it, with the timer
    # that BentoML leaves armed cancelled (TimelyTimeout, installed below).
    traffic={"timeout": SETTINGS.timeout_seconds + 60},
    # Traces, when an OTLP endpoint is set the standard way (OTEL_EXPORTER_OTLP_ENDPOINT):
    # backends/api/operations/tracing.py.
    tracing=tracing_config(),
    # BentoML's access log and HTTP metrics name raw paths, job and image ids included; the edge
    # (backends/api/edge/middleware.py) logs and counts by route template instead, and serves /metrics.
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},
    http={
        "cors": {
            "enabled": True,
            # Exact origins (or *) to BentoML's CORS middleware, those with any port as a regex.
            "access_control_allow_origins": ["*"] if ORIGINS.any else ORIGINS.exact,
            "access_control_allow_origin_regex": ORIGINS.regex,
            "access_control_allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
            "access_control_allow_headers": ["*"],
            "access_control_expose_headers": headers.EXPOSED,
        }
    },
)(bentoml.asgi_app(dialects)(SDXL))
# BentoML imports it from there when it builds the app (tests/test_service.py checks it is there).
traffic.TimeoutMiddleware = TimelyTimeout  # type: ignore[misc]
SDXL.add_asgi_middleware(  # type: ignore[attr-defined]
    Edge,
    keys=SETTINGS.api_keys,
    open_metrics=SETTINGS.open_metrics,
    max_body_bytes=SETTINGS.max_body_bytes,
    cors_origins=SETTINGS.cors_origins,
    allowed_hosts=SETTINGS.allowed_hosts,
    state=dialects.state,
)
