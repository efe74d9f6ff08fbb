"""The peer: what users write themselves, one shared diffusers pipeline behind FastAPI (no
queue, no batching, no checks). bench/serving_overhead.py serves it with uvicorn beside this
server, on the same weights: `SDXL_PEER_MODEL=<diffusers folder> uvicorn bench.peer_fastapi:app`."""

import base64
import io
import os

import torch
from diffusers import StableDiffusionXLPipeline
from fastapi import FastAPI

app = FastAPI()
pipe = StableDiffusionXLPipeline.from_pretrained(os.environ["SDXL_PEER_MODEL"])


@app.post("/generate")
def generate(body: dict) -> dict:
    image = pipe(
        body["prompt"],
        width=body["width"],
        height=body["height"],
        num_inference_steps=body["steps"],
        guidance_scale=body["guidance_scale"],
        generator=torch.Generator().manual_seed(body["seed"]),
    ).images[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"b64_json": base64.b64encode(buffer.getvalue()).decode()}
