"""The models: `manager` (the only code that loads, places and frees them), `records` (what a
loaded model is), `pipelines` (the diffusers pipelines built over one set of weights), `modes`
(memory modes), `fast_paths` (speed settings), `schedulers`, and the side models: `loras`,
`controlnets`, `ip_adapters` and `upscalers`."""
