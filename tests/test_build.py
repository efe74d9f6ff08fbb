"""`bentoml build` makes a bento that serves, and references, the store models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.served import ROOT


def test_bento_references_the_served_models(tiny_model):
    env = {**os.environ, "SDXL_MODELS": "tiny-sdxl"}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    tag = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    shown = subprocess.run(
        [sys.executable, "-m", "bentoml", "get", tag, "-o", "json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    bento = json.loads(shown.stdout)
    service = bento["services"][0]
    assert [model["tag"] for model in service["models"]] == [str(tiny_model.tag)]
    assert service["config"]["resources"] == {"gpu": 1}
    assert service["config"]["traffic"]["timeout"] >= 300
