"""Headers: the API key a request presents, and the response headers of every generation
route (moondream-station clients read them)."""

from __future__ import annotations

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
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")
