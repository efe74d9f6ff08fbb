"""Full-size SDXL on whatever device is here, with random weights: no download needed.

The pipeline is built from SDXL base's published configs (below) with random weights (time
and memory do not depend on the values), saved as a store directory would be, and loaded
back with the service's own loader. Then, in one run:

- load time: the service's loader vs. plain `from_pretrained(...).to(device)`;
- latency at SIZE x SIZE, STEPS steps with guidance (p50 of RUNS after a warm-up) and peak
  memory, in each memory mode (high, balanced, low), and for the plain diffusers pipeline
  with default settings (float32, default scheduler) as the baseline;
- images/s at batch 1, 2, 4 at SIZE with guidance, and at FAST_SIZE with FAST_STEPS steps
  without guidance (turbo-like);
- one and two ControlNets (SDXL's full ControlNet architecture, made from the UNet as
  diffusers does for training), through the service's ControlNet pipeline, against mode high;
- each speed setting of the service (fast_paths.py: eager vs SDPA attention, fused QKV,
  channels-last, int8 and fp8 weights, torch.compile, all together) loaded by the service's
  loader, against the plain service load in the placement's dtype (bfloat16 on a recent card):
  p50 at batch 1 and 4, the first call (compilation included) and peak memory; and float16
  with SDXL's own VAE (upcast to float32 to decode) against a VAE that needs no upcast, as the
  fp16-fix VAE (SDXL_VAE=sdxl-vae-fp16-fix) runs.

Needs only torch, diffusers, transformers and accelerate (no BentoML):

    python bench/gpu_sdxl.py                # full size: for a GPU
    python bench/gpu_sdxl.py --tiny         # tiny-sdxl at small sizes: checks the script on a CPU
    python bench/gpu_sdxl.py --fast-paths plain,fuse-qkv,compile   # a subset of the settings

It prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from backends.sdxl_backend.device import Placement, select_placement  # noqa: E402
from backends.sdxl_backend.fast_paths import FastPaths  # noqa: E402
from backends.sdxl_backend.pipelines import (  # noqa: E402
    MEMORY_MODES,
    apply_memory_mode,
    load_pipelines,
    with_controlnets,
)
from models.tiny import build_tiny_controlnet, build_tiny_sdxl, make_tokenizer  # noqa: E402

# Each speed setting alone, then together; "plain" is the service's default.
FAST_PATHS = {
    "plain": FastPaths(),
    "eager-attention": FastPaths(attention="eager"),
    "fuse-qkv": FastPaths(fuse_qkv=True),
    "channels-last": FastPaths(channels_last=True),
    "int8": FastPaths(quantize="int8"),
    "fp8": FastPaths(quantize="fp8"),
    "compile": FastPaths(compile=True),
    "fuse-qkv+channels-last+compile": FastPaths(fuse_qkv=True, channels_last=True, compile=True),
    "all+fp8": FastPaths(fuse_qkv=True, channels_last=True, compile=True, quantize="fp8"),
}
# float16 with SDXL's own VAE (upcast to float32 to decode), and with one that needs no upcast
VAE_CHOICES = ("fp16-own-vae", "fp16-no-upcast-vae")

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# vae/config.json
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def build_full_sdxl(device: torch.device, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """SDXL base's architecture, random weights, built on the device (fast) in `dtype`.
    The tokenizer is tiny-sdxl's byte-level one: its ids are valid in CLIP's vocabulary."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = AutoencoderKL(**SDXL_VAE).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)).to(dtype)
    tokenizer = make_tokenizer()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def timed(pipeline, device: torch.device, runs: int, first: list | None = None, **call) -> list[float]:
    """Seconds per call, after one warm-up call (its seconds appended to `first`)."""
    pipeline.set_progress_bar_config(disable=True)
    synchronize(device)
    started = time.perf_counter()
    pipeline(**call, generator=torch.Generator("cpu").manual_seed(0))
    synchronize(device)
    if first is not None:
        first.append(time.perf_counter() - started)
    seconds = []
    for run in range(runs):
        synchronize(device)
        started = time.perf_counter()
        pipeline(**call, generator=torch.Generator("cpu").manual_seed(run))
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-sdxl at small sizes (a check of the script)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--fast-size", type=int)
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (low mode: 1)")
    parser.add_argument("--modes", default=",".join(MEMORY_MODES))
    parser.add_argument("--fast-paths", default=",".join([*FAST_PATHS, *VAE_CHOICES]),
                        help=f"comma-separated, of: {', '.join([*FAST_PATHS, *VAE_CHOICES])}; empty: none")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_sdxl.json"))
    args = parser.parse_args()
    size = args.size or (128 if args.tiny else 1024)
    fast_size = args.fast_size or (64 if args.tiny else 512)

    placement = select_placement()
    device = placement.device
    report: dict = {
        "device": placement.describe(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "size": size, "steps": args.steps, "guidance": args.guidance,
        "fast_size": fast_size, "fast_steps": args.fast_steps,
    }
    call = dict(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=args.steps,
                guidance_scale=args.guidance)

    store = Path(tempfile.mkdtemp(prefix="sdxl-bench-store-"))
    started = time.perf_counter()
    built = build_tiny_sdxl() if args.tiny else build_full_sdxl(device, torch.float16)
    built.save_pretrained(store, variant=None if args.tiny else "fp16")
    report["build_and_save_s"] = round(time.perf_counter() - started, 1)
    del built
    reset_peak(device)

    # The baseline: plain diffusers with default settings (float32, default scheduler).
    started = time.perf_counter()
    baseline = StableDiffusionXLPipeline.from_pretrained(
        store, variant=None if args.tiny else "fp16", local_files_only=True).to(device)
    synchronize(device)
    report["baseline_load_s"] = round(time.perf_counter() - started, 2)
    reset_peak(device)
    seconds = timed(baseline, device, args.runs, **call)
    report["baseline"] = {"p50_s": round(statistics.median(seconds), 3), "peak_bytes": peak_bytes(device)}
    del baseline
    reset_peak(device)

    # The service's loader and memory modes.
    started = time.perf_counter()
    pipelines = load_pipelines(store, placement, "high")
    synchronize(device)
    report["load_s"] = round(time.perf_counter() - started, 2)
    report["modes"] = {}
    for mode in args.modes.split(","):
        apply_memory_mode(pipelines, mode, placement)
        reset_peak(device)
        seconds = timed(pipelines.txt2img, device, 1 if mode == "low" else args.runs, **call)
        report["modes"][mode] = {"p50_s": round(statistics.median(seconds), 3), "peak_bytes": peak_bytes(device)}
        report["modes"][mode]["speedup_vs_baseline"] = round(report["baseline"]["p50_s"] / statistics.median(seconds), 2)

    apply_memory_mode(pipelines, "high", placement)
    controlnet = (build_tiny_controlnet() if args.tiny else ControlNetModel.from_unet(pipelines.txt2img.unet)).to(
        device, placement.dtype)
    edges = Image.new("RGB", (size, size))
    edges.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    report["controlnets"] = {}
    unguided = report["modes"].get("high", {}).get("p50_s", float("nan"))
    for count in (1, 2):
        reset_peak(device)
        guided = with_controlnets(pipelines, "txt2img", [controlnet] * count)
        seconds = timed(guided, device, args.runs, **call, image=[edges] * count if count > 1 else edges)
        report["controlnets"][str(count)] = {"p50_s": round(statistics.median(seconds), 3),
                                             "peak_bytes": peak_bytes(device),
                                             "vs_mode_high": round(statistics.median(seconds) / unguided, 2)}
    del controlnet, guided

    report["throughput"] = {}
    for label, extra in ((f"{size}px_{args.steps}steps_cfg", {}),
                         (f"{fast_size}px_{args.fast_steps}steps_nocfg",
                          dict(width=fast_size, height=fast_size, num_inference_steps=args.fast_steps,
                               guidance_scale=0.0))):
        for batch in (1, 2, 4):
            seconds = timed(pipelines.txt2img, device, max(1, args.runs // 2),
                            **{**call, **extra, "num_images_per_prompt": batch})
            report["throughput"][f"{label}_batch{batch}"] = round(batch / statistics.median(seconds), 3)

    del pipelines
    reset_peak(device)
    report["fast_paths"] = {}
    for name in [n for n in args.fast_paths.split(",") if n]:
        report["fast_paths"][name] = fast_path_figures(store, placement, name, call, args.runs)
        plain = report["fast_paths"].get("plain")
        if plain:
            report["fast_paths"][name]["speedup_vs_plain"] = round(
                plain["batch1_p50_s"] / report["fast_paths"][name]["batch1_p50_s"], 2)

    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {args.out}")


def fast_path_figures(store: Path, placement: Placement, name: str, call: dict, runs: int) -> dict:
    """One speed setting (or VAE choice): load with the service's loader, time batch 1 and 4."""
    device = placement.device
    vae = None
    if name in VAE_CHOICES:
        placement = Placement(device, torch.float16)
        fast = FastPaths()
        if name == VAE_CHOICES[1]:  # the same architecture, configured as the fp16-fix VAE is
            vae = store / "vae-no-upcast"
            config = json.loads((store / "vae" / "config.json").read_text())
            AutoencoderKL.from_config({**config, "force_upcast": False}).save_pretrained(vae)
    else:
        fast = FAST_PATHS[name]
    torch._dynamo.reset()
    reset_peak(device)
    try:
        started = time.perf_counter()
        pipelines = load_pipelines(store, placement, "high", fast, vae)
        synchronize(device)
        load_s = time.perf_counter() - started
        first: list[float] = []
        one = timed(pipelines.txt2img, device, runs, first, **call)
        four = timed(pipelines.txt2img, device, max(1, runs // 2), first, **call, num_images_per_prompt=4)
    except Exception as exc:  # a setting this card or build cannot run: say so, go on
        print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"[:300], "batch1_p50_s": float("nan")}
    figures = {"load_s": round(load_s, 2), "first_call_s": round(first[0], 2),
               "batch1_p50_s": round(statistics.median(one), 3),
               "batch4_images_per_s": round(4 / statistics.median(four), 3), "peak_bytes": peak_bytes(device)}
    del pipelines
    reset_peak(device)
    return figures


def print_table(report: dict) -> None:
    def gib(value: int | None) -> str:
        return f"{value / 2**30:.2f}" if value is not None else "n/a (cpu)"

    print(f"device: {report['device']}, torch {report['torch']}{' (tiny-sdxl)' if report['tiny'] else ''}")
    print(f"load from store directory: service {report['load_s']} s, plain diffusers {report['baseline_load_s']} s")
    print(f"\n{report['size']}x{report['size']}, {report['steps']} steps, guidance {report['guidance']}:")
    print("| setup | p50 s | peak GiB | vs baseline |\n| --- | --- | --- | --- |")
    print(f"| plain diffusers, defaults (float32) | {report['baseline']['p50_s']} | "
          f"{gib(report['baseline']['peak_bytes'])} | 1.00x |")
    for mode, figures in report["modes"].items():
        print(f"| service, mode {mode} | {figures['p50_s']} | {gib(figures['peak_bytes'])} | "
              f"{figures['speedup_vs_baseline']}x |")
    print("\nControlNets (service, mode high):\n| ControlNets | p50 s | peak GiB | vs none |\n| --- | --- | --- | --- |")
    for count, figures in report["controlnets"].items():
        print(f"| {count} | {figures['p50_s']} | {gib(figures['peak_bytes'])} | {figures['vs_mode_high']}x |")
    print("\nimages/s (service, mode high):\n| workload | batch | images/s |\n| --- | --- | --- |")
    for key, value in report["throughput"].items():
        workload, _, batch = key.rpartition("_batch")
        print(f"| {workload} | {batch} | {value} |")
    if report["fast_paths"]:
        print(f"\nspeed settings ({report['size']}px, {report['steps']} steps, guidance; service loader, mode high):")
        print("| setting | load s | first call s | batch 1 p50 s | vs plain | batch 4 images/s | peak GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, f in report["fast_paths"].items():
            if "error" in f:
                print(f"| {name} | failed: {f['error'][:80]} | | | | | |")
                continue
            print(f"| {name} | {f['load_s']} | {f['first_call_s']} | {f['batch1_p50_s']} | "
                  f"{f.get('speedup_vs_plain', '-')}x | {f['batch4_images_per_s']} | {gib(f['peak_bytes'])} |")


if __name__ == "__main__":
    main()
