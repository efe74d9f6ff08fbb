"""Headers: the API key a request presents, and the response headers of every generation
route (moondream-station clients read them)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

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


def key_is_valid(presented: str | None, keys: list[str]) -> bool:
    """Constant-time against every key, so timing tells nothing about which prefix matched;
    compared as SHA-256 digests, whose length is the same whatever a key's (compare_digest
    returns early on a length mismatch)."""
    if presented is None:
        return False
    digest = hashlib.sha256(presented.encode()).digest()
    matches = [hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()) for key in keys]
    return any(matches)


def holds_admin_key(headers: Headers, api_keys: list[str], admin_keys: list[str]) -> bool:
    """Whether the caller may act for every tenant (unload the models, see every key's queue
    and errors): without API keys every caller is one; without admin keys listed, every key is
    one (a single tenant's server); else only SDXL_ADMIN_KEYS."""
    return not api_keys or not admin_keys or key_is_valid(presented_key(headers), admin_keys)
