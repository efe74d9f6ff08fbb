"""SDXL generation, free of HTTP, BentoML and environment variables.

Where things are, by concern:
- the contract: `protocol` (`GenerationRequest` in, `GenerationResult` out), `errors`, `limits`;
- a request's way: `engine` (`Engine.prepare()` in the handler, `Engine.generate()` on the
  device), `validation` (defaults filled in, every field checked), `prepared` (what waits in
  the queue), `denoise` (the pipeline call in numbered steps), `progress` (each step handed to
  the requests in a call), `infotext` (A1111's parameters text), `images` and `masks`;
- prompts: `prompts` (parsed and cut into chunks), `prompt_encoder` (both text encoders, clip
  skip, A1111's weights), `embeddings` (textual inversion);
- models: `model_manager` (the only code that loads, places and frees them), `model_records`,
  `pipelines`, `modes` (memory modes), `fast_paths` (speed settings), `schedulers`, and the
  side models: `loras`, `controlnets`, `ip_adapters`, `upscalers` with `upscaling`;
- the device: `device` (placement and dtype), `device_thread` (the one thread that runs torch);
- `jobs/`: the queue (in this process, or shared through Redis) and the device worker.
"""
