"""SDXL models in the BentoML model store: import (hub, local path, tiny), list, remove.

Each model is one BentoML model named by its friendly id, holding a diffusers directory (a
pipeline), one component's directory (a VAE or a ControlNet: `config.json` and its weights),
a LoRA's weights (`pytorch_lora_weights.safetensors`), an embedding's vectors
(`embedding.safetensors`), an IP-Adapter's weights and image encoder (`ip-adapter.safetensors`,
`image_encoder/`) or an upscaler's weights and card (`upscaler.safetensors`, `upscaler.json`).
LoRAs, ControlNets and IP-Adapters carry a `fits` label: the UNet architecture they were made
for (backends/sdxl_backend/models/loras.py); embeddings, the text encoders' widths
(backends/sdxl_backend/prompts/embeddings.py); upscalers fit every model. Labels record what it is and
where it came from: `sdxl_id`, `sdxl_kind`, `source`, `revision`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import bentoml

from backends.sdxl_backend.models.ip_adapters import ENCODER_FOLDER, IP_ADAPTER_FILE, is_ip_adapter
from backends.sdxl_backend.models.loras import LORA_FILE, SDXL_UNET, model_unet_signature
from backends.sdxl_backend.models.upscalers import UPSCALER_SUFFIXES, read_upscaler, save_upscaler
from backends.sdxl_backend.prompts.embeddings import EMBEDDING_FILE, SDXL_TEXT, file_signature
from models.catalog import CatalogEntry
from models.hub_files import select_component_files, select_encoder_files, select_files
from models.sampling_facts import set_sampling, single_file_sampling

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
BENTOML_METADATA = ("model.yaml", "custom_objects.pkl")


class ImportFailed(Exception):
    """A model could not be imported; the message is one line, fit for a user."""


def stored_models(kind: str | None = "pipeline") -> dict[str, bentoml.Model]:
    """The newest stored version of every SDXL model of `kind` ("pipeline", "vae", "lora",
    "controlnet"; None: every kind), by friendly id."""
    newest: dict[str, bentoml.Model] = {}
    for model in bentoml.models.list():
        model_id = model.info.labels.get("sdxl_id")
        if not model_id or kind not in (None, model.info.labels.get("sdxl_kind", "pipeline")):
            continue
        if model_id not in newest or model.creation_time > newest[model_id].creation_time:
            newest[model_id] = model
    return newest


def stored_model(model_id: str, kind: str | None = None) -> bentoml.Model | None:
    return stored_models(kind).get(model_id)


def model_size(model: bentoml.Model) -> int:
    return sum(f.stat().st_size for f in Path(model.path).rglob("*") if f.is_file())


def remove(model_id: str) -> list[str]:
    """Delete every stored version of `model_id`; returns the tags deleted."""
    tags = [str(m.tag) for m in bentoml.models.list() if m.info.labels.get("sdxl_id") == model_id]
    for tag in tags:
        bentoml.models.delete(tag)
    return tags


def _store(
    model_id: str,
    source: str,
    revision: str,
    fill: Callable[[Path], None],
    labels: dict[str, str] | None = None,
    kind: str = "pipeline",
) -> bentoml.Model:
    """Create a BentoML model and let `fill` write the diffusers directory into it; labels say
    where it came from and what it holds (variant, dtype of the stored weights). A failure
    leaves nothing behind in the store."""
    if not ID_PATTERN.match(model_id):
        raise ImportFailed(f"'{model_id}' is not a valid model id: use lowercase letters, digits, '.', '_', '-'")
    with bentoml.models.create(
        model_id,
        labels={"sdxl_id": model_id, "sdxl_kind": kind, "source": source, "revision": revision, **(labels or {})},
    ) as model:
        path = Path(model.path)
        fill(path)
        fp16 = any(path.glob("*.fp16.safetensors")) or any(path.glob("*/*.fp16.safetensors"))
        model.info.labels.update({"variant": "fp16" if fp16 else "none", "dtype": "float16" if fp16 else "as saved"})
    return bentoml.models.get(model.tag)  # as stored: the model being created lives in a temporary folder


def _place(src: Path, dst: Path) -> None:
    """Weights are hard-linked into the new model's folder when possible (BentoML then copies
    that folder into the store); every other file is copied, so that nothing written to the new
    model (BentoML rewrites its metadata) can change the source through a shared file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.name.endswith(".safetensors"):
        try:
            os.link(src.resolve(), dst)
            return
        except OSError:
            pass
    shutil.copy2(src.resolve(), dst)


def _copy_tree(src: Path, dst: Path) -> None:
    """A diffusers directory, which may be another BentoML model's (its metadata stays behind)."""
    for file in sorted(src.rglob("*")):
        if file.is_file() and file.relative_to(src).parts[0] not in BENTOML_METADATA:
            _place(file, dst / file.relative_to(src))


TINY = (
    "tiny-sdxl",
    "tiny-sdxl-refiner",
    "tiny-sdxl-vae",
    "tiny-sdxl-lora",
    "tiny-sdxl-vpred",
    "tiny-sdxl-controlnet",
    "tiny-sdxl-embedding",
    "tiny-sdxl-ip-adapter",
    "tiny-upscaler",
)  # built locally


def import_tiny(model_id: str = "tiny-sdxl") -> bentoml.Model:
    from models.tiny import tiny_recipe

    kind, fill, labels = tiny_recipe(model_id)
    return _store(model_id, "generated:models/tiny.py", "1", fill, labels, kind=kind)


def model_unet_signature_of(model_id: str) -> str | None:
    """The UNet signature of a stored pipeline (what its LoRAs must fit); None if not stored."""
    model = stored_model(model_id, "pipeline")
    return model_unet_signature(Path(model.path)) if model else None


def import_from_path(
    model_id: str,
    path: Path,
    config: str | None = None,
    fits: str | None = None,
    encoder: Path | None = None,
    prediction: str | None = None,
    zero_snr: bool | None = None,
) -> bentoml.Model:
    """A diffusers directory: a pipeline, or a ControlNet's (`config.json` naming a
    `ControlNetModel`, or a `ControlNetUnionModel`); a single-file `.safetensors` SDXL
    checkpoint (converted to the diffusers layout; `config` names the diffusers repo or
    directory whose configs it follows); a LoRA `.safetensors` (diffusers/PEFT or kohya/A1111
    keys); or an SDXL textual-inversion embedding
    (`clip_l` and `clip_g`, fitting the models whose text encoders have their widths); or an
    IP-Adapter `.safetensors` (`image_proj.*`, `ip_adapter.*`) with its image `encoder`'s
    directory; or an upscale model (`.pth`, `.pt`, or a `.safetensors` spandrel recognises: ESRGAN,
    SwinIR, HAT, DAT...). LoRAs, ControlNets and IP-Adapters fit SDXL base's architecture unless
    `fits` names a stored model whose UNet they were made for. A pipeline's sampling facts
    (`prediction` "epsilon" or "v", `zero_snr`) are its scheduler config's unless given; a
    single file's are read from its `v_pred` and `ztsnr` keys, as v-prediction checkpoints
    carry them."""
    path = path.expanduser().resolve()
    if path.is_dir():
        if _class_name(path / "config.json") in ("ControlNetModel", "ControlNetUnionModel"):
            return _store(
                model_id,
                f"local:{path}",
                "-",
                lambda dst: _copy_tree(path, dst),
                {"fits": _fits(fits)},
                kind="controlnet",
            )
        if not (path / "model_index.json").is_file():
            raise ImportFailed(
                f"{path} is not a diffusers directory (no model_index.json, nor a ControlNet's config.json)"
            )

        def copied(dst: Path) -> None:
            _copy_tree(path, dst)
            set_sampling(dst, prediction, zero_snr)

        return _store(model_id, f"local:{path}", "-", copied)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return _store(model_id, f"local:{path}", "-", lambda dst: _convert_upscaler(path, dst), kind="upscaler")
    if path.is_file() and path.suffix == ".safetensors":
        if (widths := file_signature(path)) is not None:
            return _store(
                model_id,
                f"local:{path}",
                "-",
                lambda dst: _place(path, dst / EMBEDDING_FILE),
                {"fits": widths},
                kind="embedding",
            )
        if is_ip_adapter(path):
            if encoder is None or not (encoder / "config.json").is_file():
                raise ImportFailed(
                    f"{path.name} is an IP-Adapter: give its image encoder's directory with --encoder "
                    "(a CLIP vision model: config.json and model.safetensors)"
                )
            image_encoder = encoder.expanduser().resolve()

            def fill(dst: Path) -> None:
                _place(path, dst / IP_ADAPTER_FILE)
                _copy_tree(image_encoder, dst / ENCODER_FOLDER)

            return _store(model_id, f"local:{path}", "-", fill, {"fits": _fits(fits)}, kind="ip-adapter")
        if is_lora(path):
            return _store(
                model_id,
                f"local:{path}",
                "-",
                lambda dst: _place(path, dst / LORA_FILE),
                {"fits": _fits(fits)},
                kind="lora",
            )
        if is_upscaler(path):
            return _store(model_id, f"local:{path}", "-", lambda dst: _convert_upscaler(path, dst), kind="upscaler")
        marked = single_file_sampling(path)

        def converted(dst: Path) -> None:
            _convert_single_file(path, dst, config)
            set_sampling(dst, prediction or marked[0], marked[1] if zero_snr is None else zero_snr)

        return _store(model_id, f"local:{path}", "-", converted)
    raise ImportFailed(f"{path} is neither a diffusers directory nor a .safetensors or .pth file")


def _class_name(config: Path) -> str | None:
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


def is_lora(path: Path) -> bool:
    """LoRA files name their factors: `lora_A`/`lora_B` (PEFT), `lora.down`/`lora_down` (kohya)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as weights:
        return any("lora" in key for key in weights.keys())


def is_upscaler(path: Path) -> bool:
    """A .safetensors file, none of the kinds with key names of their own (embeddings,
    IP-Adapters, LoRAs: checked before), small enough to be an upscaler (under 1 GiB: the
    largest, HAT-L and DAT, are a few hundred MB; an SDXL checkpoint is several GB) that
    spandrel recognises."""
    if path.stat().st_size > 2**30:
        return False
    try:
        read_upscaler(path)
    except ValueError:
        return False
    return True


def _convert_upscaler(file: Path, dst: Path) -> None:
    """An upscale model file in the store's layout (a .pth read by spandrel's restricted
    unpickler, never Python's own)."""
    if file.suffix not in UPSCALER_SUFFIXES:
        raise ImportFailed(f"{file.name}: an upscaler is a {', '.join(UPSCALER_SUFFIXES)} file")
    try:
        save_upscaler(read_upscaler(file), dst)
    except ValueError as exc:
        raise ImportFailed(str(exc)) from exc


def _fits(model_id: str | None) -> str:
    if model_id is None:
        return SDXL_UNET
    signature = model_unet_signature_of(model_id)
    if signature is None:
        raise ImportFailed(f"--fits {model_id}: no such model in the store")
    return signature


def _convert_single_file(path: Path, dst: Path, config: str | None) -> None:
    from diffusers import StableDiffusionXLPipeline

    try:
        pipeline = StableDiffusionXLPipeline.from_single_file(str(path), config=config)
    except Exception as exc:  # diffusers raises many kinds; the user needs the reason, not the trace
        raise ImportFailed(f"cannot convert {path.name}: {exc}".splitlines()[0]) from exc
    pipeline.save_pretrained(dst, safe_serialization=True)


def import_from_hub(entry: CatalogEntry, revision: str | None = None) -> bentoml.Model:  # noqa: C901 (each failure named)
    """Download only what the pipeline needs into the HF cache (resumable, with progress
    bars), then place it in the new model."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    if entry.repo is None:
        raise ImportFailed(f"{entry.id} is not downloaded: it is built locally")
    try:
        if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE=1: what the hub cache already holds, no network
            cached = Path(snapshot_download(entry.repo, revision=revision, local_files_only=True))
            sha, repo_files = cached.name, [str(f.relative_to(cached)) for f in cached.rglob("*") if f.is_file()]
        else:
            info = HfApi().model_info(entry.repo, revision=revision)
            sha, repo_files = str(info.sha), [s.rfilename for s in info.siblings or []]
        if entry.kind == "pipeline":
            model_index = json.loads(
                Path(
                    hf_hub_download(
                        entry.repo, "model_index.json", revision=sha, local_files_only=constants.HF_HUB_OFFLINE
                    )
                ).read_text()
            )
            wanted = select_files(repo_files, model_index)
        elif entry.kind in ("lora", "embedding", "upscaler"):
            wanted = [entry.weights_file]
        elif entry.kind == "ip-adapter":  # its file and its image encoder's config and weights
            if entry.encoder is None:
                raise ImportFailed("an IP-Adapter's catalog entry names its image encoder's folder (encoder)")
            wanted = [entry.weights_file, *select_encoder_files(repo_files, entry.encoder)]
        else:
            wanted = select_component_files(repo_files)
        if entry.unet:
            wanted = [f for f in wanted if not (f.startswith("unet/") and ".safetensors" in f)]
        snapshot = Path(
            snapshot_download(
                entry.repo, revision=sha, allow_patterns=wanted, local_files_only=constants.HF_HUB_OFFLINE
            )
        )
        unet_file = Path(hf_hub_download(entry.unet[0], entry.unet[1])) if entry.unet else None
    except ImportFailed:
        raise
    except Exception as exc:  # network, auth and not-found errors of huggingface_hub and httpx
        raise ImportFailed(_hub_error(entry.repo, exc)) from exc

    def fill(path: Path) -> None:
        if entry.kind == "upscaler":
            return _convert_upscaler(snapshot / entry.weights_file, path)
        placed_as = {"lora": LORA_FILE, "embedding": EMBEDDING_FILE, "ip-adapter": IP_ADAPTER_FILE}
        for name in wanted:
            if entry.kind == "ip-adapter" and name != entry.weights:
                _place(snapshot / name, path / ENCODER_FOLDER / Path(name).name)
            else:
                _place(snapshot / name, path / placed_as.get(entry.kind, name))
        if unet_file is not None:
            _place(unet_file, path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
        if entry.kind == "pipeline":
            set_sampling(path, entry.prediction, entry.zero_snr)

    source = f"hf:{entry.repo}" + (f"+{entry.unet[0]}/{entry.unet[1]}" if entry.unet else "")
    # The revision of every component: the repo's commit, and the replacing UNet's (its cache path names it).
    labels = {"unet_revision": unet_file.parent.name} if unet_file is not None else {}
    if entry.kind in ("lora", "controlnet", "ip-adapter"):
        labels["fits"] = SDXL_UNET
    if entry.kind == "embedding":
        labels["fits"] = SDXL_TEXT
    return _store(entry.id, source, sha, fill, labels, kind=entry.kind)


def _hub_error(repo: str, exc: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return f"{repo} is gated: accept its licence on the hub and set HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo} was not found on the hub (or is private: set HF_TOKEN)"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"cannot download {repo} from the Hugging Face hub at {constants.ENDPOINT}: {reason}"
