"""A stored pipeline's sampling facts (what its UNet predicts, whether it was trained with
zero-terminal SNR), as an import learns them: from a single file's marker keys, or as given,
written into its scheduler config, which every scheduler a request picks starts from."""

from __future__ import annotations

import json
from pathlib import Path


def single_file_sampling(path: Path) -> tuple[str | None, bool | None]:
    """What a single-file checkpoint says of its sampling: v-prediction checkpoints (NoobAI-XL's
    v-pred line, and the tools that train them) carry an empty `v_pred` tensor, and a `ztsnr`
    one when trained with zero-terminal SNR. (None: it does not say.)"""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
    return ("v" if "v_pred" in keys else None), (True if "ztsnr" in keys else None)


def set_sampling(pipeline_dir: Path, prediction: str | None, zero_snr: bool | None) -> None:
    """Write a stored pipeline's sampling facts into its scheduler config, which every
    scheduler a request picks starts from (nothing to write when neither is given). A model
    trained with zero-terminal SNR is sampled on trailing timesteps, which reach its last one."""
    if prediction is None and zero_snr is None:
        return
    file = pipeline_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    if prediction is not None:
        config["prediction_type"] = {"v": "v_prediction", "epsilon": "epsilon"}[prediction]
    if zero_snr is not None:
        config["rescale_betas_zero_snr"] = zero_snr
        if zero_snr:
            config["timestep_spacing"] = "trailing"
    file.write_text(json.dumps(config, indent=2))
