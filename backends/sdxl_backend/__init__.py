"""SDXL generation, free of HTTP, BentoML and environment variables.

Where things are, by concern:
- the contract, at the top: `protocol` (`GenerationRequest` in, `GenerationResult` out), `units`
  (the side models a request names), `image_bytes` (images in JSON), `upscale_protocol`,
  `errors`, `limits`;
- `generation/`: a request's way, from `Engine.prepare()` to the pipeline call's steps;
- `prompts/`: weights, chunks, prompt editing, both text encoders, embeddings;
- `models/`: loading, placing and freeing models, memory modes, speed settings, the side models;
- the device: `device` (placement and dtype), `device_thread` (the one thread that runs torch);
- `jobs/`: the queue (in this process, or shared through Redis) and the device worker.

Imports run down that list's reverse: `jobs` and `generation` use `models` and `prompts`, which
use the contract; nothing here imports the HTTP side.
"""
