"""The service's settings, all from environment variables (the README's table lists them).
Request limits are in backends/sdxl_backend/limits.py, device choice in device.py."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]


# The defaults of the settings that have one; the service declares them to BentoML too, so a
# bento's image and a BentoCloud deployment start from the same values.
DEFAULTS = {
    "SDXL_CORS_ORIGINS": "*",
    "SDXL_TIMEOUT_SECONDS": "600",
    "SDXL_WARMUP": "1",
    "SDXL_IMAGE_URL_TTL_SECONDS": "3600",
    "SDXL_IMAGE_URL_MAX_BYTES": str(256 * 2**20),
    "SDXL_MAX_QUEUE": "64",
    "SDXL_JOB_TTL_SECONDS": "3600",
    "SDXL_MAX_JOBS": "1000",
    "SDXL_JOB_MAX_BYTES": str(512 * 2**20),
    "SDXL_ALLOW_CLIENT_VRAM_MODE": "1",
}


class ServiceSettings(BaseModel):
    models: list[str]  # empty: every SDXL model in the store
    default_model: str | None
    aliases: dict[str, str]
    api_keys: list[str]  # empty: no key needed
    cors_origins: list[str]
    timeout_s: int
    warmup: bool
    image_url_ttl_s: float
    image_url_max_bytes: int
    public_url: str | None  # base of image links when behind a proxy; default: the request's own
    max_queue: int  # jobs waiting for the device; more get 429
    job_ttl_s: float  # finished jobs (and their images) are kept this long
    max_jobs: int  # ... and at most this many
    job_max_bytes: int  # ... holding at most this many bytes of images
    client_vram_mode: bool  # whether X-VRAM-Mode / vram_mode from clients is applied
    test_fault_oom: str | None  # the out-of-memory test seam (engine.OutOfMemorySeam); tests only

    @classmethod
    def from_env(cls) -> "ServiceSettings":
        def env(name: str) -> str:
            return os.environ.get(name, DEFAULTS.get(name, ""))

        return cls(
            models=_items(env("SDXL_MODELS")),
            default_model=env("SDXL_DEFAULT_MODEL") or None,
            aliases=parse_aliases(env("SDXL_MODEL_ALIASES")),
            api_keys=load_api_keys(env("SDXL_API_KEYS")),
            cors_origins=_items(env("SDXL_CORS_ORIGINS")),
            timeout_s=int(env("SDXL_TIMEOUT_SECONDS")),
            warmup=env("SDXL_WARMUP") == "1",
            image_url_ttl_s=float(env("SDXL_IMAGE_URL_TTL_SECONDS")),
            image_url_max_bytes=int(env("SDXL_IMAGE_URL_MAX_BYTES")),
            public_url=env("SDXL_PUBLIC_URL").rstrip("/") or None,
            max_queue=int(env("SDXL_MAX_QUEUE")),
            job_ttl_s=float(env("SDXL_JOB_TTL_SECONDS")),
            max_jobs=int(env("SDXL_MAX_JOBS")),
            job_max_bytes=int(env("SDXL_JOB_MAX_BYTES")),
            client_vram_mode=env("SDXL_ALLOW_CLIENT_VRAM_MODE") == "1",
            test_fault_oom=env("SDXL_TEST_FAULT_OOM") or None,
        )


def parse_aliases(text: str) -> dict[str, str]:
    """'sdxl-realism=juggernaut-xl,sdxl-anime=tiny-sdxl' -> {'sdxl-realism': 'juggernaut-xl', ...}"""
    aliases = {}
    for item in _items(text):
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise ValueError(f"SDXL_MODEL_ALIASES: '{item}' is not of the form alias=model")
        aliases[alias.strip()] = target.strip()
    return aliases


def load_api_keys(value: str) -> list[str]:
    """Comma-separated keys, or the path of a file with one key per line (or comma-separated)."""
    if value and Path(value).is_file():
        value = Path(value).read_text()
    return _items(value)
