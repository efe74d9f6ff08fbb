"""The AUTOMATIC1111 dialect's listings, which its clients read before they send a request:
models, LoRAs, embeddings, samplers and schedules, VAEs, upscalers, scripts, the ControlNet
extension's models and modules. What this server does not have is listed truthfully empty."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from backends.api.a1111.extras import upscaler_listing
from backends.api.a1111.mapping import SCHEDULES, samplers
from backends.api.a1111.options import vae_file
from backends.api.composition.runtime import Runtime, runtime_of
from backends.api.edge import errors
from backends.sdxl_backend.models.controlnets import PREPROCESSORS

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


@router.get("/sd-models", responses=errors.responses(401))
async def models(runtime: RuntimeDep) -> list[dict[str, Any]]:
    return [
        {
            "title": model.id,
            "model_name": model.id,
            "hash": model.version[:10],
            "sha256": None,
            "filename": model.id,
            "config": None,
        }
        for model in runtime.served.values()
    ]


@router.get("/loras", responses=errors.responses(401))
async def loras(runtime: RuntimeDep) -> list[dict[str, Any]]:
    """A1111's LoRA listing: `name` is what goes in `<lora:name:weight>`."""
    return [
        {"name": lora.id, "alias": lora.id, "path": f"{lora.id}.safetensors", "metadata": {}}
        for lora in runtime.loras.values()
    ]


@router.get("/scripts", responses=errors.responses(401))
async def scripts(runtime: RuntimeDep) -> dict[str, list[str]]:
    """The scripts a request may turn on: ControlNet (`alwayson_scripts`) when one is served."""
    served = ["controlnet"] if runtime.controlnets or runtime.ip_adapters else []
    return {"txt2img": served, "img2img": served}


@router.get("/samplers", responses=errors.responses(401))
async def list_samplers() -> list[dict[str, Any]]:
    return samplers()


@router.get("/schedulers", responses=errors.responses(401))
async def schedulers() -> list[dict[str, Any]]:
    """The noise schedules a sampler can be combined with (`scheduler`; which sampler takes
    which: mapping.PAIRS)."""
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in SCHEDULES.items()
    ]


@router.get("/sd-vae", responses=errors.responses(401))
@router.get("/sd-modules", responses=errors.responses(401))
async def vaes(runtime: RuntimeDep) -> list[dict[str, Any]]:
    """The VAE the server runs in place of every model's (SDXL_VAE), if any: what `sd_vae` and
    Forge's `forge_additional_modules` (whose listing /sd-modules is) may name."""
    vae = runtime.settings.vae
    return [{"model_name": vae, "filename": vae_file(vae)}] if vae else []


@router.get("/upscalers", responses=errors.responses(401))
async def upscalers(runtime: RuntimeDep) -> list[dict[str, Any]]:
    """The upscalers of the Extras tab and the hires fix: None, Lanczos and the served upscale
    models (the latent one is under /latent-upscale-modes)."""
    return upscaler_listing({upscaler: source.scale for upscaler, source in runtime.upscaler_sources.items()})


@router.get("/latent-upscale-modes", responses=errors.responses(401))
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": "Latent"}]


@router.get("/embeddings", responses=errors.responses(401))
async def embeddings(runtime: RuntimeDep) -> dict[str, Any]:
    """The served embeddings, as A1111 lists its loaded ones: a prompt names one by its id
    (`shape`: the width of its OpenCLIP-G vectors)."""
    vectors = runtime.embedding_vectors()
    return {
        "loaded": {
            embedding.id: {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": int(embedding.fits.split("+")[1]),
                "vectors": vectors[embedding.id],
            }
            for embedding in runtime.embeddings.values()
        },
        "skipped": {},
    }


# What this server does not have, listed as A1111 lists an empty collection.
EMPTY_LISTINGS: dict[str, Any] = {
    "/hypernetworks": [],
    "/face-restorers": [],
    "/realesrgan-models": [],
    "/prompt-styles": [],
    "/script-info": [],
    "/cmd-flags": {},
    "/extensions": [],
}


def empty_listing(path: str) -> Callable[[], Awaitable[Any]]:
    async def listing() -> Any:
        return EMPTY_LISTINGS[path]

    return listing


for _path in EMPTY_LISTINGS:
    router.add_api_route(
        _path,
        empty_listing(_path),
        methods=["GET"],
        responses=errors.responses(401),
        name=_path.strip("/").replace("-", "_"),
    )


# The sd-webui-controlnet extension's own routes, which its clients read before sending units.
controlnet_router = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111"])
IMAGE_PROMPT_MODULE = "ip-adapter-auto"  # the extension's module that picks the adapter's own encoder


@controlnet_router.get("/version", responses=errors.responses(401))
async def controlnet_version() -> dict[str, int]:
    return {"version": 2}


@controlnet_router.get("/model_list", responses=errors.responses(401))
async def controlnet_models(runtime: RuntimeDep) -> dict[str, list[str]]:
    """The served ControlNets and IP-Adapters: what a unit's `model` names."""
    return {"model_list": [*runtime.controlnets, *runtime.ip_adapters]}


@controlnet_router.get("/module_list", responses=errors.responses(401))
async def controlnet_modules() -> dict[str, list[str]]:
    """The preprocessors, and the IP-Adapters' image reading: a unit's `module`."""
    return {"module_list": [*PREPROCESSORS, IMAGE_PROMPT_MODULE]}
