"""Full-size SDXL on whatever device is here, with random weights: no download needed.

The pipeline is built from SDXL base's published configs (below) with random weights (time
and memory do not depend on the values), saved as a store directory would be, and loaded
back with the service's own loader. Then, in this order, so that a lease that runs out keeps
what matters most (SIZE x SIZE, STEPS steps with guidance; p50 of RUNS after a warm-up; peak
memory):

- the baseline: plain diffusers (`from_pretrained(...).to(device)`) in the placement's dtype
  (bfloat16 on a recent card), batch 1 and batch 4, and its load time;
- the service's loader and memory modes high and balanced;
- each speed setting of the service (fast_paths.py: fused QKV, channels-last, fp8 and int8
  weights, torch.compile, eager vs SDPA attention, some together) loaded by the service's
  loader: load time, the first call (compilation included), p50 at batch 1 and images/s at
  batch 4, each against plain diffusers, and peak memory; and float16 with SDXL's own VAE
  (upcast to float32 to decode) against a VAE that needs no upcast, as the fp16-fix VAE
  (SDXL_VAE=sdxl-vae-fp16-fix) runs;
- memory mode low (one call: weights stream from the host, so its time is the cost of that);
- images/s at batch 1, 2, 4 at SIZE with guidance and at FAST_SIZE with FAST_STEPS steps
  without guidance (turbo-like);
- one and two ControlNets (SDXL's full ControlNet architecture, made from the UNet as
  diffusers does for training), through the service's ControlNet pipeline.

`--budget-s` bounds the run: a part starts only when its estimate (from the baseline's
times) fits in what is left, and the parts left out are listed. The tables and the JSON are
written after every part (--out, and the tables beside it as .md), so a run stopped from
outside still leaves what it measured.

Needs torch, diffusers, transformers and accelerate (no BentoML); torchao for int8 and fp8:

    python bench/gpu_sdxl.py                # full size: for a GPU (bench/gpu_lease.sh on a lent one)
    python bench/gpu_sdxl.py --tiny         # tiny-sdxl at small sizes: checks the script on a CPU
    python bench/gpu_sdxl.py --fast-paths plain,fuse-qkv,compile   # a subset of the settings
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

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from backends.sdxl_backend.device import Placement, select_placement
from backends.sdxl_backend.models.fast_paths import FastPaths
from backends.sdxl_backend.models.pipelines import (
    MEMORY_MODES,
    Pipelines,
    apply_memory_mode,
    load_pipelines,
    pipeline_for,
)
from models.tiny import build_tiny_controlnet, build_tiny_sdxl, make_tokenizer

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
# The order a run takes them in: the likeliest gains first, so that a short budget keeps them.
FAST_PATHS_IN_ORDER = (
    "plain",
    "compile",
    "fp8",
    "fuse-qkv",
    "channels-last",
    "fp16-no-upcast-vae",
    "fp16-own-vae",
    "all+fp8",
    "int8",
    "eager-attention",
    "fuse-qkv+channels-last+compile",
)
assert set(FAST_PATHS_IN_ORDER) == {*FAST_PATHS, *VAE_CHOICES}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
# vae/config.json
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_G = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


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
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
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


def timed(
    pipeline, device: torch.device, runs: int, first: list | None = None, warm_up: bool = True, **call
) -> list[float]:
    """Seconds per call, after one warm-up call (its seconds appended to `first`)."""
    pipeline.set_progress_bar_config(disable=True)
    if warm_up:
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


class Budget:
    """The seconds this run may take; a part starts only when its estimate fits in what is left."""

    def __init__(self, seconds: float, report: dict):
        self.end = time.monotonic() + seconds if seconds > 0 else float("inf")
        self.report = report

    def allows(self, part: str, estimate_s: float) -> bool:
        if time.monotonic() + estimate_s <= self.end:
            return True
        self.report["skipped"].append(part)
        print(f"skipped (budget): {part}, about {estimate_s:.0f} s", file=sys.stderr, flush=True)
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-sdxl at small sizes (a check of the script)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--fast-size", type=int)
    parser.add_argument("--fast-steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure (batch 4 and low mode: 1)")
    parser.add_argument("--modes", default=",".join(MEMORY_MODES))
    parser.add_argument(
        "--fast-paths",
        default=",".join(FAST_PATHS_IN_ORDER),
        help=f"comma-separated, of: {', '.join(FAST_PATHS_IN_ORDER)}; empty: none",
    )
    parser.add_argument("--budget-s", type=float, default=0, help="seconds the whole run may take; 0: no bound")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_sdxl.json"))
    args = parser.parse_args()
    size = args.size or (128 if args.tiny else 1024)
    fast_size = args.fast_size or (64 if args.tiny else 512)
    modes = args.modes.split(",")

    placement = select_placement()
    device = placement.device
    report: dict = {
        "device": placement.describe(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "size": size,
        "steps": args.steps,
        "guidance": args.guidance,
        "runs": args.runs,
        "fast_size": fast_size,
        "fast_steps": args.fast_steps,
        "modes": {},
        "fast_paths": {},
        "throughput": {},
        "controlnets": {},
        "skipped": [],
    }
    budget = Budget(args.budget_s, report)
    call = {
        "prompt": "a lighthouse at dusk",
        "width": size,
        "height": size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
    }

    store = Path(tempfile.mkdtemp(prefix="sdxl-bench-store-"))
    started = time.perf_counter()
    built = build_tiny_sdxl() if args.tiny else build_full_sdxl(device, torch.float16)
    built.save_pretrained(store, variant=None if args.tiny else "fp16")
    report["build_and_save_s"] = round(time.perf_counter() - started, 1)
    del built
    reset_peak(device)

    # The baseline: plain diffusers in the dtype the service would use.
    started = time.perf_counter()
    baseline = StableDiffusionXLPipeline.from_pretrained(
        store, variant=None if args.tiny else "fp16", torch_dtype=placement.dtype, local_files_only=True
    ).to(device)
    synchronize(device)
    load_s = time.perf_counter() - started
    reset_peak(device)
    one = timed(baseline, device, args.runs, **call)
    four = timed(baseline, device, 1, warm_up=False, **call, num_images_per_prompt=4)
    report["baseline"] = {
        "load_s": round(load_s, 2),
        "batch1_p50_s": round(statistics.median(one), 3),
        "batch4_images_per_s": round(4 / statistics.median(four), 3),
        "peak_bytes": peak_bytes(device),
    }
    del baseline
    reset_peak(device)
    save(report, args.out)
    p50, p50_four = statistics.median(one), statistics.median(four)
    setting_s = load_s + (args.runs + 1) * p50 + p50_four  # what one speed setting's figures take

    # The service's loader and memory modes; low (weights streamed from the host) comes later.
    started = time.perf_counter()
    pipelines = load_pipelines(store, placement, "high")
    synchronize(device)
    report["load_s"] = round(time.perf_counter() - started, 2)
    for mode in [m for m in modes if m != "low"]:
        if budget.allows(f"mode {mode}", 3 * (args.runs + 1) * p50):
            mode_figures(report, pipelines, mode, placement, args.runs, call)
            save(report, args.out)
    del pipelines
    reset_peak(device)

    for name in [n for n in args.fast_paths.split(",") if n]:
        compiles = "compile" in name  # about a minute per shape on a GPU host's cores
        estimate_s = setting_s * 3 + (0 if args.tiny else 60) if compiles else setting_s
        if budget.allows(f"setting {name}", estimate_s):
            report["fast_paths"][name] = fast_path_figures(store, placement, name, call, args.runs, report["baseline"])
            save(report, args.out)

    loaded: list[Pipelines] = []

    def service() -> Pipelines:
        """The service's pipelines in mode high, loaded again once a part that needs them starts."""
        if not loaded:
            loaded.append(load_pipelines(store, placement, "high"))
        return loaded[0]

    if "low" in modes and budget.allows("mode low", 20 * p50):
        mode_figures(report, service(), "low", placement, 1, call, warm_up=False)
        apply_memory_mode(service(), "high", placement)
        save(report, args.out)

    for label, extra in (
        (f"{size}px_{args.steps}steps_cfg", {}),
        (
            f"{fast_size}px_{args.fast_steps}steps_nocfg",
            {"width": fast_size, "height": fast_size, "num_inference_steps": args.fast_steps, "guidance_scale": 0.0},
        ),
    ):
        scale = 1 if not extra else (fast_size / size) ** 2 * args.fast_steps / args.steps
        if not budget.allows(f"images/s {label}", 2 * (1 + 2 + 4) * p50 * scale):
            continue
        for batch in (1, 2, 4):
            seconds = timed(service().txt2img, device, 1, **{**call, **extra, "num_images_per_prompt": batch})
            report["throughput"][f"{label}_batch{batch}"] = round(batch / statistics.median(seconds), 3)
        save(report, args.out)

    unguided = report["modes"].get("high", {}).get("p50_s", float("nan"))
    controlnet = None
    edges = Image.new("RGB", (size, size))
    edges.paste((255, 255, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    for count in (1, 2):
        if not budget.allows(f"{count} ControlNet(s)", (args.runs + 1) * p50 * (1 + count / 2)):
            continue
        controlnet = controlnet or (
            build_tiny_controlnet() if args.tiny else ControlNetModel.from_unet(service().txt2img.unet)
        ).to(device, placement.dtype)
        reset_peak(device)
        guided = pipeline_for(service(), "txt2img", [controlnet] * count)
        seconds = timed(guided, device, args.runs, **call, image=[edges] * count if count > 1 else edges)
        report["controlnets"][str(count)] = {
            "p50_s": round(statistics.median(seconds), 3),
            "peak_bytes": peak_bytes(device),
            "vs_mode_high": round(statistics.median(seconds) / unguided, 2),
        }
        del guided
        save(report, args.out)

    save(report, args.out)
    print(tables(report))
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.md')}")


def mode_figures(
    report: dict, pipelines, mode: str, placement: Placement, runs: int, call: dict, warm_up: bool = True
) -> None:
    apply_memory_mode(pipelines, mode, placement)
    reset_peak(placement.device)
    seconds = timed(pipelines.txt2img, placement.device, runs, warm_up=warm_up, **call)
    report["modes"][mode] = {
        "p50_s": round(statistics.median(seconds), 3),
        "peak_bytes": peak_bytes(placement.device),
        "vs_diffusers": round(report["baseline"]["batch1_p50_s"] / statistics.median(seconds), 2),
    }


def fast_path_figures(store: Path, placement: Placement, name: str, call: dict, runs: int, baseline: dict) -> dict:
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
        # batch 4 warms up only where it compiles (a new shape): elsewhere its first call is a plain one
        four = timed(pipelines.txt2img, device, 1, warm_up=fast.compile, **call, num_images_per_prompt=4)
    except Exception as exc:  # a setting this card or build cannot run: say so, go on
        print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    figures = {
        "load_s": round(load_s, 2),
        "first_call_s": round(first[0], 2),
        "batch1_p50_s": round(statistics.median(one), 3),
        "batch4_images_per_s": round(4 / statistics.median(four), 3),
        "peak_bytes": peak_bytes(device),
    }
    figures["batch1_vs_diffusers"] = round(baseline["batch1_p50_s"] / figures["batch1_p50_s"], 2)
    figures["batch4_vs_diffusers"] = round(figures["batch4_images_per_s"] / baseline["batch4_images_per_s"], 2)
    del pipelines
    reset_peak(device)
    return figures


def save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(tables(report) + "\n")


def tables(report: dict) -> str:
    """The report as the Markdown tables docs/benchmarks.md takes."""

    def gib(value: int | None) -> str:
        return f"{value / 2**30:.2f}" if value is not None else "n/a (cpu)"

    base = report["baseline"]
    lines = [
        f"device: {report['device']}, torch {report['torch']}{' (tiny-sdxl)' if report['tiny'] else ''}; "
        f"{report['size']}x{report['size']}, {report['steps']} steps, guidance {report['guidance']}, "
        f"p50 of {report['runs']} after a warm-up (batch 4: one call, warmed up only where it compiles)",
        f"build and save {report['build_and_save_s']} s; load from the store directory: plain diffusers "
        f"{base['load_s']} s, service {report.get('load_s', '-')} s",
        "",
        "| setup | batch 1 p50 s | vs diffusers | peak GiB |",
        "| --- | --- | --- | --- |",
        f"| plain diffusers (batch 4: {base['batch4_images_per_s']} images/s) | {base['batch1_p50_s']} | 1.00x | "
        f"{gib(base['peak_bytes'])} |",
    ]
    lines += [
        f"| service, memory mode {mode}{' (one call, no warm-up)' if mode == 'low' else ''} | {f['p50_s']} | "
        f"{f['vs_diffusers']}x | {gib(f['peak_bytes'])} |"
        for mode, f in report["modes"].items()
    ]
    if report["fast_paths"]:
        lines += [
            "",
            "Speed settings (service loader, memory mode high; against plain diffusers):",
            "",
            "| setting | load s | first call s | batch 1 p50 s | vs diffusers | batch 4 images/s | vs diffusers "
            "| peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, f in report["fast_paths"].items():
            lines.append(
                f"| {name} | failed: {f['error'][:100]} | | | | | | |"
                if "error" in f
                else f"| {name} | {f['load_s']} | {f['first_call_s']} | {f['batch1_p50_s']} | "
                f"{f['batch1_vs_diffusers']}x | {f['batch4_images_per_s']} | {f['batch4_vs_diffusers']}x | "
                f"{gib(f['peak_bytes'])} |"
            )
    if report["throughput"]:
        lines += [
            "",
            "Images/s (service, memory mode high, one call each):",
            "",
            "| workload | batch | images/s |",
            "| --- | --- | --- |",
        ]
        for key, value in report["throughput"].items():
            workload, _, batch = key.rpartition("_batch")
            lines.append(f"| {workload} | {batch} | {value} |")
    if report["controlnets"]:
        lines += [
            "",
            "ControlNets (service, memory mode high):",
            "",
            "| ControlNets | p50 s | peak GiB | vs none |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {count} | {f['p50_s']} | {gib(f['peak_bytes'])} | {f['vs_mode_high']}x |"
            for count, f in report["controlnets"].items()
        ]
    if report["skipped"]:
        lines += ["", f"Left out to stay within the time budget: {', '.join(report['skipped'])}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
