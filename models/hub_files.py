"""Which files of a hub repository an import fetches: a pipeline's configs, tokenizers and
diffusers weights (fp16 where the repository has them), a component's, an image encoder's;
never the single-file checkpoints beside them."""

from __future__ import annotations

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".safetensors.index.fp16.json")
CONFIG_NAMES = (
    "config.json",
    "scheduler_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "added_tokens.json",
)


def select_files(repo_files: list[str], model_index: dict) -> list[str]:
    """The files a diffusers pipeline needs: configs and tokenizers of the components that
    `model_index.json` names, and per component the fp16 safetensors weights when the repo has
    them, else the plain safetensors. Never .bin/.ckpt/onnx/flax copies or root checkpoints."""
    components = {name for name, value in model_index.items() if isinstance(value, list) and value[0]}
    chosen = ["model_index.json"]
    for component in sorted(components):
        files = [f for f in repo_files if f.count("/") == 1 and f.split("/")[0] == component]
        chosen += [f for f in files if f.split("/")[1] in CONFIG_NAMES]
        weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
        fp16 = [f for f in weights if ".fp16." in f or "fp16-" in f]
        chosen += fp16 or [f for f in weights if "fp16" not in f]
    return chosen


def select_component_files(repo_files: list[str]) -> list[str]:
    """A component repository (a VAE, a ControlNet): its config and its diffusers weights at the top, fp16
    when the repo has them; never the single-file checkpoints beside them, nor another version's
    weights under another name (xinsir's ControlNet Union keeps `diffusion_pytorch_model_promax`)."""
    weights = [
        f
        for f in repo_files
        if "/" not in f
        and f.startswith(("diffusion_pytorch_model.", "diffusion_pytorch_model-"))
        and f.endswith(WEIGHT_SUFFIXES)
    ]
    fp16 = [f for f in weights if ".fp16." in f]
    return ["config.json", *(fp16 or weights)]


def select_encoder_files(repo_files: list[str], folder: str) -> list[str]:
    """An IP-Adapter's image encoder in its repo: the folder's config and safetensors weights."""
    inside = [f for f in repo_files if f.rpartition("/")[0] == folder]
    return [f for f in inside if f.endswith(("/config.json", ".safetensors"))]
