"""Every setting of the service, read once from `SDXL_*` environment variables at start.

`load_settings()` is called once (service.py) and the object is passed down: the backend
reads no environment variable. A bad value stops the start with the variable's name and what
it accepts. docs/configuration.md lists the same variables (a test holds the two together).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backends.api.edge.guards import LOCAL_ORIGINS
from backends.sdxl_backend.jobs.turns import QueueOrder
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.fast_paths import Attention, FastPaths, Quantization
from backends.sdxl_backend.models.modes import MemoryPolicy
from backends.sdxl_backend.models.upscalers import Tiling
from backends.sdxl_backend.prompts.reader import PromptSyntax
from backends.sdxl_backend.protocol import VramMode

PREFIX = "SDXL_"


def _items(value: Any) -> Any:
    """'a, b,c' (or one per line) -> ['a', 'b', 'c']; lists pass through."""
    if not isinstance(value, str):
        return value
    return [item.strip() for item in value.replace("\n", ",").split(",") if item.strip()]


def _aliases(value: Any) -> Any:
    """'sdxl-realism=juggernaut-xl,sdxl-anime=tiny-sdxl' -> {'sdxl-realism': 'juggernaut-xl', ...}"""
    if not isinstance(value, str):
        return value
    aliases = {}
    for item in _items(value):
        alias, sep, target = item.partition("=")
        if not sep or not alias.strip() or not target.strip():
            raise ValueError(f"'{item}' is not of the form alias=model")
        aliases[alias.strip()] = target.strip()
    return aliases


def _keys(value: Any) -> Any:
    """Comma-separated keys, or the path of a file with one key per line (or comma-separated)."""
    if isinstance(value, str) and value and Path(value).is_file():
        value = Path(value).read_text()
    return _items(value)


def parse_bytes(text: str) -> int:
    """'24GiB', '500MB', '1.5G', '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 24GiB, 500MB, 1073741824)")
    number, unit, binary = match.groups()
    base = 1024 if binary.startswith("i") or not binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


Names = Annotated[list[str], NoDecode, BeforeValidator(_items)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore")

    # What is served
    models: Names = []  # empty: every SDXL model in the store (or, in a bento, the models it packed)
    default_model: str | None = None
    openai_model: str | None = None  # what OpenAI's ids (dall-e-3, gpt-image-1...) get; default: the default model
    model_aliases: Annotated[dict[str, str], NoDecode, BeforeValidator(_aliases)] = {}
    # HTTP
    api_keys: Annotated[list[str], NoDecode, BeforeValidator(_keys)] = Field([], repr=False)
    priority_keys: Annotated[list[str], NoDecode, BeforeValidator(_keys)] = Field([], repr=False)  # may send 'high'
    # may act for every tenant (unload, other keys' fleet rows and errors); none listed: every key
    admin_keys: Annotated[list[str], NoDecode, BeforeValidator(_keys)] = Field([], repr=False)
    allow_open: bool = False  # serve a network address without API keys (guards.py: refused otherwise)
    cors_origins: Names = LOCAL_ORIGINS  # which web pages may call (guards.py); "*": every page
    allowed_hosts: Names = []  # Host names served besides localhost and IP literals; "*": every name
    open_metrics: bool = False  # /metrics without a key (a Prometheus scraper on the pod network)
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line (logs.py)
    max_body_bytes: int = Field(32 * 2**20, ge=1024)  # larger bodies get 413 before any parsing
    timeout_seconds: int = Field(600, ge=1)
    public_url: str | None = None  # base of image links when behind a proxy; default: the request's own
    image_url_ttl_seconds: float = Field(3600, gt=0)
    image_url_max_bytes: int = Field(256 * 2**20, ge=0)
    # Scale-out: the Redis every replica shares (the job queue, the kept images); unset: each keeps its own
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", repr=False)
    # Jobs
    max_queue: int = Field(64, ge=1)  # jobs waiting for the device; more get 429
    # jobs one API key may have waiting; more get 429; 0: half of max_queue with API keys (one key
    # never fills the queue), no bound without (every caller is one)
    max_queued_per_key: int = Field(0, ge=0)
    queue_order: QueueOrder = "fair"  # "fair": API keys take turns (jobs/turns.py); "fifo": arrival order
    max_batch: int = Field(4, ge=1)  # images of compatible jobs in one pipeline call; 1: each job alone
    job_ttl_seconds: float = Field(3600, gt=0)  # finished jobs (and their images) are kept this long
    max_jobs: int = Field(1000, ge=1)  # ... and at most this many
    job_max_bytes: int = Field(512 * 2**20, ge=0)  # ... holding at most this many bytes
    warmup: bool = True
    max_event_streams: int = Field(256, ge=1)  # open /v1/jobs/{id}/events streams per API key; more get 429
    # Webhooks (webhooks.py): where they may go (names, CIDRs; empty: off), their signing secret
    webhook_allowed_hosts: Names = []
    webhook_secret: str | None = Field(None, repr=False, validate_default=True)
    webhook_attempts: int = Field(5, ge=1)
    webhook_retry_seconds: float = Field(2.0, gt=0)
    webhook_timeout_seconds: float = Field(10.0, gt=0, le=300)  # one attempt, all of it (webhook_sender.py)
    # Where job records are kept so that a restarted worker still answers for its ids; default:
    # a folder in the temporary directory of this `bentoml serve` (removed when it stops).
    jobs_dir: Path | None = None
    # Device and memory
    device: str = "auto"
    devices: Names = []  # several devices, one worker each ("cuda:0,cuda:1", "all", "cpu,cpu"); default: SDXL_DEVICE
    torch_threads: int | None = Field(None, ge=1)  # the device thread's CPU threads; default: the usable cores
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    memory_budget: Annotated[int | None, BeforeValidator(lambda v: parse_bytes(v) if isinstance(v, str) else v)] = None
    vram_mode: VramMode = "high"
    allow_client_vram_mode: bool = True
    vae_tiling_pixels: int = Field(1536 * 1536, ge=0)
    idle_unload_seconds: float = Field(0, ge=0)  # 0: never
    max_loaded_loras: int = Field(8, ge=1)  # LoRAs kept loaded per model; the least recently used go first
    max_loaded_controlnets: int = Field(2, ge=1)  # ControlNets kept loaded; the least recently used go first
    max_loaded_ip_adapters: int = Field(2, ge=1)  # IP-Adapters (and their encoders) kept loaded; likewise
    max_loaded_upscalers: int = Field(1, ge=1)  # upscale models kept loaded; likewise
    max_upscales: int = Field(4, ge=1)  # upscale calls waiting or running at once (each holds its image); more get 429
    upscale_tile: int = Field(Tiling.tile, ge=0)  # input pixels per tile side of an upscale; 0: never cut
    upscale_tile_overlap: int = Field(Tiling.overlap, ge=0)  # pixels each tile shares with its neighbours
    # Speed (backends/sdxl_backend/models/fast_paths.py has their meaning)
    vae: str | None = None  # a stored VAE (python -m models import sdxl-vae-fp16-fix) in place of each model's
    attention: Attention = FastPaths.attention
    fuse_qkv: bool = FastPaths.fuse_qkv
    channels_last: bool = FastPaths.channels_last
    quantize: Quantization = FastPaths.quantize
    compile: bool = FastPaths.compile
    # Request limits (backends/sdxl_backend/limits.py has their meaning)
    min_side: int = Field(Limits().min_side, ge=8)
    max_side: int = Field(Limits().max_side, ge=8)
    max_pixels: int = Field(Limits().max_pixels, ge=64)
    max_steps: int = Field(Limits().max_steps, ge=1)
    max_guidance_scale: float = Field(Limits().max_guidance_scale, ge=0)
    max_images: int = Field(Limits().max_images, ge=1)
    max_prompt_chars: int = Field(Limits().max_prompt_chars, ge=1)
    max_prompt_chunks: int = Field(Limits().max_prompt_chunks, ge=1)
    prompt_syntax: PromptSyntax = "a1111"  # "plain": brackets and BREAK are text (prompts.py)
    max_input_image_bytes: int = Field(Limits().max_input_image_bytes, ge=1)
    max_input_image_pixels: int = Field(Limits().max_input_image_pixels, ge=1)
    max_upscale_pixels: int = Field(Limits().max_upscale_pixels, ge=1)
    # Tests only: "N[@STEP]" makes the first N tries of each request run out of memory
    test_fault_oom: str | None = Field(None, pattern=r"^\d+(@\d+)?$")
    # Tests only: the device of that name ("cpu#1") is lost at its first job, as a GPU off its bus
    test_fault_device: str | None = None
    # Tests only: while this file exists, a job whose prompt says "park" waits after its first step
    test_park_file: Path | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|(cuda|xpu)(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N, mps, xpu or xpu:N")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/*\s]+?(:(\d+|\*))?", origin):
                raise ValueError(f"'{origin}' is not an origin: scheme://host[:port], the port may be *, or *")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("webhook_allowed_hosts"):
            raise ValueError("must be set with SDXL_WEBHOOK_ALLOWED_HOSTS: webhooks are signed")
        if value is not None:
            from standardwebhooks import Webhook

            try:
                Webhook(value)
            except Exception:
                raise ValueError(
                    "must be whsec_ followed by base64 (e.g. whsec_ and 32 random bytes in base64)"
                ) from None
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str]) -> list[str]:
        if value == ["all"]:
            return value
        for name in value:
            if not re.fullmatch(r"cpu|(cuda|xpu)(:\d+)?|mps", name):
                raise ValueError(f"'{name}' is not a device: use all, or a list of cpu, cuda, cuda:N, mps, xpu, xpu:N")
        return value

    @field_validator("priority_keys", "admin_keys")
    @classmethod
    def _listed_keys_are_keys(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and not set(value) <= set(info.data.get("api_keys") or []):
            kind = (info.field_name or "").removesuffix("_keys")
            raise ValueError(f"every {kind} key must be one of SDXL_API_KEYS")
        return value

    @field_validator("upscale_tile")
    @classmethod
    def _tile_size(cls, value: int) -> int:
        if 0 < value < 32:
            raise ValueError("an upscale tile is 0 (never cut) or at least 32 pixels")
        return value

    @field_validator("upscale_tile_overlap")
    @classmethod
    def _tile_overlap(cls, value: int, info: ValidationInfo) -> int:
        tile = info.data.get("upscale_tile") or 0
        if tile and value * 2 >= tile:
            raise ValueError(f"the overlap must be under half the tile (SDXL_UPSCALE_TILE={tile})")
        return value

    @field_validator("fuse_qkv")
    @classmethod
    def _fused_needs_sdpa(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("attention") != "sdpa":
            raise ValueError("fused QKV projections run on SDPA attention: set SDXL_ATTENTION=sdpa or SDXL_FUSE_QKV=0")
        return value

    @property
    def queued_per_key_bound(self) -> int:
        """The jobs one key may have waiting (0: no bound): SDXL_MAX_QUEUED_PER_KEY, else with API
        keys half the queue, so that one key never fills it for the others."""
        if self.max_queued_per_key or not self.api_keys:
            return self.max_queued_per_key
        return max(1, self.max_queue // 2)

    @property
    def limits(self) -> Limits:
        return Limits(**{name: getattr(self, name) for name in Limits.model_fields})

    @property
    def upscale_tiling(self) -> Tiling:
        return Tiling(self.upscale_tile, self.upscale_tile_overlap)

    @property
    def fast_paths(self) -> FastPaths:
        return FastPaths(
            attention=self.attention,
            fuse_qkv=self.fuse_qkv,
            channels_last=self.channels_last,
            quantize=self.quantize,
            compile=self.compile,
        )

    @property
    def memory_policy(self) -> MemoryPolicy:
        return MemoryPolicy(
            budget=self.memory_budget,
            default_mode=self.vram_mode,
            tiling_pixels=self.vae_tiling_pixels,
            idle_unload_s=self.idle_unload_seconds or None,
        )


SECRET_SETTINGS = (
    "api_keys",
    "priority_keys",
    "admin_keys",
    "redis_url",
    "webhook_secret",
)  # never shown back, even when wrong: they may hold passwords


class SettingsError(Exception):
    """A setting has a bad value; the message names each variable and what it accepts."""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            f"{env_name(str(error['loc'][0]))}={error['input']!r}: {error['msg'].removeprefix('Value error, ')}"
            if error["loc"] and error["input"] is not None and error["loc"][0] not in SECRET_SETTINGS
            else f"{env_name(str(error['loc'][0]))}: {error['msg'].removeprefix('Value error, ')}"
            for error in exc.errors()
        ]
        raise SettingsError("bad setting: " + "; ".join(problems)) from None


def declared_environment() -> dict[str, str]:
    """Every variable that has a default, as text, for BentoML's `envs=`: the bento's image and
    a BentoCloud deployment start from the same values. (BentoML takes a declared variable
    without a value for a required one, so those without a default are left out.)"""

    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        if isinstance(value, dict):
            return ",".join(f"{k}={v}" for k, v in value.items())
        return "" if value is None else str(value)

    declared = {env_name(name): text(field.default) for name, field in Settings.model_fields.items()}
    return {name: value for name, value in declared.items() if value}
