"""The AUTOMATIC1111 dialect (`/sdapi/v1/...`), for the many tools that speak only this API,
`webuiapi` first among them.

A1111 clients send every field of A1111's request model, most at their defaults. Fields this
server honours are mapped; `eta` is honoured where A1111 honours it (DDIM, and the ancestral
samplers at their one value here, 1.0) and ignored where A1111 ignores it; any other field is
accepted only at A1111's default (or empty), and refused with a 400 naming it otherwise, so an
option the client turned on (hires fix, face restoration, scripts...) is never
silently dropped. LoRAs come as A1111 prompts carry them, `<lora:name:weight>`, and are
taken out of the text the encoders see. ControlNet and IP-Adapter units come as the
sd-webui-controlnet extension takes them, in `alwayson_scripts.controlnet.args`, and its
`/controlnet/...` listings are served. `/interrupt` and `/skip` end the caller's running
generation at its next step and its request answers with the image as it stood, as A1111's do.
The Extras tab's upscaling (`/extra-single-image`, `/extra-batch-images`) runs the served upscale
models, which `/upscalers` lists and a hires fix's `hr_upscaler` names. The listings of things
this server does not have (VAEs, face restorers...) are truthfully empty; `/loras` lists the
served LoRAs, `/embeddings` the served textual-inversion embeddings, `/scripts` ControlNet when
one is served.

The package: protocol.py (the wire models), mapping.py (their meaning here; units.py for the
ControlNet extension's units), routes.py and listings.py (the routes), extras.py (the Extras
tab: its models, upscaler names and routes).
"""

from fastapi import APIRouter

from backends.api.a1111 import extras, listings, routes

router = APIRouter()
router.include_router(routes.router)
router.include_router(listings.router)
router.include_router(extras.router)
controlnet_router = listings.controlnet_router

__all__ = ["controlnet_router", "router"]
