"""Headers: the API key a request presents, and the response headers of every generation
route (moondream-station clients read them)."""

from __future__ import annotations

import base64
import binascii

from starlette.datastructures import Headers

from backends.sdxl_backend.protocol import GenerationResult

# Headers a browser client may read across origins (CORS Access-Control-Expose-Headers).
EXPOSED = [
    "X-Model",
    "X-Seed",
    "X-Inference-Time",
    "X-Model-Load-Time",
    "X-VRAM-Used",
    "X-VRAM-Total",
    "X-VRAM-Mode",
    "X-Device",
]


def result_headers(
    result: GenerationResult, device: str, memory: tuple[int, int] | None, inference_ms: bool = False
) -> dict[str, str]:
    """Times in seconds, except X-Inference-Time with `inference_ms` (moondream-station's
    route: the gallery reads that header as milliseconds); the device memory as `vram_headers`
    gives it (X-Device says which device served)."""
    inference = f"{result.timings.inference_s * 1000:.1f}" if inference_ms else f"{result.timings.inference_s:.3f}"
    headers = {
        "X-Model": result.model,
        "X-Seed": ",".join(str(seed) for seed in result.seeds),
        "X-Inference-Time": inference,
        "X-Model-Load-Time": f"{result.timings.load_s:.3f}",
        "X-Device": device,
        "X-VRAM-Mode": result.vram_mode,  # the mode that served, after any out-of-memory retry
    }
    return {**headers, **vram_headers(memory)}


def vram_headers(memory: tuple[int, int] | None) -> dict[str, str]:
    """X-VRAM-Used/X-VRAM-Total in MB (MiB, as moondream-station sends them and the gallery
    displays them), the device as the driver sees it; none on the CPU, which has no device memory."""
    if memory is None:
        return {}
    return {"X-VRAM-Used": str(memory[0] // 2**20), "X-VRAM-Total": str(memory[1] // 2**20)}


def presented_key(headers: Headers) -> str | None:
    """The key, from `Authorization: Bearer <key>`, `X-API-Key: <key>`, or HTTP Basic with the
    key as the password and any user name: all that A1111's clients (SillyTavern, Open WebUI)
    can send, since A1111 itself takes only Basic."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scheme.lower() == "basic" and token.strip():
        try:
            credentials = base64.b64decode(token.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return credentials.partition(":")[2] or None
    return headers.get("x-api-key")
