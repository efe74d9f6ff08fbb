"""The SDXL service: BentoML wiring and the HTTP routes.

Requests enter here, are parsed into a `GenerationRequest` (backends/api shapes the
dialects), run on the GPU in `Engine.generate()` (backends/sdxl_backend/engine.py), and the
result is shaped back into the client's dialect.

Settings (environment): SDXL_MODELS, SDXL_DEFAULT_MODEL, SDXL_TIMEOUT_SECONDS, SDXL_WARMUP,
SDXL_DEVICE, SDXL_DTYPE and the SDXL_MAX_* limits; the README lists them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import bentoml
import diffusers
import transformers
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from backends.api import errors, native
from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.engine import Engine
from backends.sdxl_backend.errors import BackendError, InvalidRequest
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.model_manager import ModelManager, ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.schedulers import SCHEDULERS
from models.catalog import defaults_for, load_catalog
from models.store import stored_models

logger = logging.getLogger("sdxl_backend")


def served_models() -> dict[str, bentoml.Model]:
    """`SDXL_MODELS` (comma-separated ids), or every SDXL model in the store."""
    stored = stored_models()
    wanted = [m.strip() for m in os.environ.get("SDXL_MODELS", "").split(",") if m.strip()]
    missing = [m for m in wanted if m not in stored]
    if missing:
        raise RuntimeError(
            f"SDXL_MODELS names {', '.join(missing)}, not in the model store; "
            f"import with `python -m models import ID` (stored: {', '.join(stored) or 'none'})"
        )
    if not stored:
        raise RuntimeError("the model store holds no SDXL model: run `python -m models import tiny-sdxl` (or sdxl-base)")
    return {m: stored[m] for m in wanted} if wanted else stored


def default_model(served: list[str]) -> str:
    """`SDXL_DEFAULT_MODEL`, else the first served model in catalog order."""
    chosen = os.environ.get("SDXL_DEFAULT_MODEL")
    if chosen:
        if chosen not in served:
            raise RuntimeError(f"SDXL_DEFAULT_MODEL={chosen} is not served (served: {', '.join(served)})")
        return chosen
    order = list(load_catalog())
    return min(served, key=lambda m: order.index(m) if m in order else len(order))


def model_attribute(model_id: str) -> str:
    return "model_" + model_id.replace("-", "_").replace(".", "_")


SERVED = served_models()
DEFAULT_MODEL = default_model(list(SERVED))

# BentoML's own OpenAPI UI (at /) documents these routes; FastAPI's second copy is off.
app = FastAPI(title="SDXL", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(BackendError)
async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
    status, body = errors.backend_error(exc)
    return JSONResponse(body, status_code=status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    status, body = errors.validation_error(exc.errors())
    return JSONResponse(body, status_code=status)


class SDXL:
    def __init__(self) -> None:
        # Backend logs go where BentoML's go (its root handler); progress bars do not.
        logger.setLevel(logging.INFO)
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        placement = select_placement()
        logger.info("device: %s; models: %s (default %s)", placement.describe(), ", ".join(SERVED), DEFAULT_MODEL)
        sources = [
            ModelSource(model_id, Path(getattr(self, model_attribute(model_id)).path), defaults_for(model_id))
            for model_id in SERVED
        ]
        self.engine = Engine(ModelManager(sources, placement), DEFAULT_MODEL, Limits.from_env())
        if os.environ.get("SDXL_WARMUP", "1") == "1":
            started = time.perf_counter()
            self.engine.submit(GenerationRequest(prompt="warm-up", steps=2)).result()
            logger.info("warm-up of %s done in %.2f s", DEFAULT_MODEL, time.perf_counter() - started)

    async def _generate(self, body: GenerationRequest, accept: str | None) -> Response:
        result = await asyncio.wrap_future(self.engine.submit(body))
        headers = native.result_headers(result)
        if native.wants_raw_image(accept):
            image = result.images[0]
            return Response(image.data, media_type=image.media_type, headers=headers)
        return JSONResponse(native.result_body(result, int(time.time())), headers=headers)

    @app.post("/v1/txt2img")
    async def txt2img(self, body: GenerationRequest, request: Request) -> Response:
        """Text to image. With `Accept: image/png` (or jpeg/webp) and n=1 the answer is the image itself."""
        if body.image is not None:
            raise InvalidRequest("image: txt2img takes no input image; use /v1/img2img", "image")
        self._check_raw(body, request)
        return await self._generate(body, request.headers.get("accept"))

    @app.post("/v1/img2img")
    async def img2img(self, body: GenerationRequest, request: Request) -> Response:
        """Image to image: `image` (base64, a data URL is fine) repainted by `strength`."""
        if body.image is None:
            raise InvalidRequest("image: img2img needs an input image (base64)", "image")
        self._check_raw(body, request)
        return await self._generate(body, request.headers.get("accept"))

    @staticmethod
    def _check_raw(body: GenerationRequest, request: Request) -> None:
        if native.wants_raw_image(request.headers.get("accept")) and body.n != 1:
            raise InvalidRequest("n: a raw image answer (Accept: image/*) holds one image; ask for JSON", "n")

    @app.get("/v1/models")
    async def list_models(self) -> dict:
        catalog = load_catalog()
        return {
            "models": [
                {
                    "id": model_id,
                    "name": model_id,
                    "description": catalog[model_id].description if model_id in catalog else "",
                    "version": model.tag.version,
                    "loaded": self.engine.models.is_loaded(model_id),
                    "default": model_id == DEFAULT_MODEL,
                }
                for model_id, model in SERVED.items()
            ]
        }

    @app.get("/v1/schedulers")
    async def list_schedulers(self) -> dict:
        return {"schedulers": [{"name": name, "label": spec.label} for name, spec in SCHEDULERS.items()]}


# BentoML finds the models a service uses among its class attributes, and `bentoml build` packs
# those. The served set is known only now, so the attributes are set before the class becomes
# a service (which is why the decorators are applied by hand).
for _model_id, _model in SERVED.items():
    setattr(SDXL, model_attribute(_model_id), bentoml.models.BentoModel(_model.tag))
SDXL = bentoml.service(
    name="sdxl",
    resources={"gpu": 1},
    workers=1,
    traffic={"timeout": int(os.environ.get("SDXL_TIMEOUT_SECONDS", "600"))},
)(bentoml.asgi_app(app)(SDXL))
