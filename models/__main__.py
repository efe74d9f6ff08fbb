"""`python -m models`: the SDXL models in the BentoML model store.

python -m models list
python -m models import ID [--from PATH [--config REPO_OR_DIR | --fits MODEL | --encoder DIR]
                                      [--prediction epsilon|v] [--zero-snr]]
                           [--revision REV] [--force]
python -m models remove ID
python -m models ensure-default    # what `make serve` runs: a store with at least one model
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.catalog import load_catalog
from models.store import (
    TINY,
    ImportFailed,
    import_from_hub,
    import_from_path,
    import_tiny,
    model_size,
    remove,
    stored_model,
    stored_models,
)

DEFAULT_IMPORT = "sdxl-base"
KIND_LABELS = {
    "vae": "[VAE, for SDXL_VAE] ",
    "lora": "[LoRA] ",
    "controlnet": "[ControlNet] ",
    "embedding": "[embedding] ",
    "ip-adapter": "[IP-Adapter] ",
    "upscaler": "[upscaler] ",
}  # in the listing


def _import(
    model_id: str,
    source: Path | None,
    config: str | None,
    revision: str | None,
    force: bool,
    fits: str | None = None,
    encoder: Path | None = None,
    prediction: str | None = None,
    zero_snr: bool | None = None,
) -> None:
    existing = stored_model(model_id)
    if existing is not None and not force:
        print(f"{model_id} is already in the store as {existing.tag} (use --force for a new version)")
        return
    catalog = load_catalog()
    if source is not None:
        model = import_from_path(model_id, source, config, fits, encoder, prediction, zero_snr)
    elif model_id in TINY:
        model = import_tiny(model_id)
    elif model_id in catalog:
        entry = catalog[model_id]
        if entry.licence:
            print(f"warning: {model_id}: {entry.licence}", file=sys.stderr)
        model = import_from_hub(entry, revision)
    else:
        raise ImportFailed(f"unknown model '{model_id}'; catalog ids: {', '.join(catalog)} (or use --from PATH)")
    print(f"imported {model_id} as {model.tag} ({model_size(model) / 2**20:.1f} MiB)")


def _list() -> None:
    stored = stored_models(kind=None)
    rows = [("ID", "STORED AS", "SIZE", "DESCRIPTION")]
    catalog = load_catalog()
    for model_id in [*catalog, *sorted(set(stored) - set(catalog))]:
        model = stored.get(model_id)
        kind: str
        if model_id in catalog:
            description, kind = catalog[model_id].description, catalog[model_id].kind
        else:  # (stored, so `model` is there)
            assert model is not None
            description, kind = model.info.labels["source"], model.info.labels.get("sdxl_kind", "pipeline")
        description = KIND_LABELS.get(kind, "") + description
        rows.append(
            (
                model_id,
                str(model.tag) if model else "-",
                f"{model_size(model) / 2**20:.1f} MiB" if model else "-",
                description,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def _ensure_default() -> None:
    """Import the default model when the store holds none; offline, fall back to tiny-sdxl."""
    if stored_models():
        return
    wanted = os.environ.get("SDXL_DEFAULT_MODEL") or DEFAULT_IMPORT
    try:
        _import(wanted, None, None, None, False)
    except ImportFailed as exc:
        if wanted == "tiny-sdxl":
            raise
        print(
            f"\n*** WARNING: could not import {wanted}: {exc}\n"
            f"*** Falling back to tiny-sdxl, which draws NOISE. Import a real model with\n"
            f"*** `python -m models import {wanted}` once the hub is reachable.\n",
            file=sys.stderr,
        )
        _import("tiny-sdxl", None, None, None, False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description="SDXL models in the BentoML store")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="catalog entries and what the store holds")
    imp = commands.add_parser("import", help="import a catalog model (hub) or a local one (--from)")
    imp.add_argument("id")
    imp.add_argument(
        "--from",
        dest="source",
        type=Path,
        help="a diffusers directory (a pipeline or a ControlNet), a .safetensors file, or an upscaler's .pth",
    )
    imp.add_argument("--config", help="for a single .safetensors file: the diffusers repo or directory of its configs")
    imp.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    imp.add_argument(
        "--fits",
        help="for a LoRA, ControlNet or IP-Adapter: the stored model whose UNet it was made for (default: SDXL base's)",
    )
    imp.add_argument("--encoder", type=Path, help="for an IP-Adapter .safetensors: its image encoder's directory")
    imp.add_argument(
        "--prediction",
        choices=["epsilon", "v"],
        help="for a pipeline: what its UNet predicts (default: its scheduler config's; a single file's v_pred key)",
    )
    imp.add_argument(
        "--zero-snr",
        action="store_true",
        default=None,
        help="for a pipeline: trained with zero-terminal SNR (default: its config's; a single file's ztsnr key)",
    )
    imp.add_argument("--force", action="store_true", help="import again even when already stored")
    rm = commands.add_parser("remove", help="delete every stored version of a model")
    rm.add_argument("id")
    commands.add_parser("ensure-default", help="import the default model if the store holds none")
    args = parser.parse_args(argv)

    try:
        if args.command == "list":
            _list()
        elif args.command == "import":
            _import(
                args.id,
                args.source,
                args.config,
                args.revision,
                args.force,
                args.fits,
                args.encoder,
                args.prediction,
                args.zero_snr,
            )
        elif args.command == "remove":
            deleted = remove(args.id)
            if not deleted:
                raise ImportFailed(f"{args.id} is not in the store")
            print(f"removed {', '.join(deleted)}")
        else:
            _ensure_default()
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
