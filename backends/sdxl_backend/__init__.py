"""SDXL generation, free of HTTP and BentoML.

Where things are:
- `protocol`: the one internal contract (`GenerationRequest` in, `GenerationResult` out);
- `engine`: `Engine.generate()`, the request's way from defaults and validation to pixels;
- `model_manager`: the only code that loads, places and frees pipelines;
- `device`, `schedulers`, `images`, `limits`, `errors`: what those need.
"""
