"""A request's way from checked to painted: `engine` (`Engine.prepare()` in the handler,
`Engine.generate()` on the device), `validation` (defaults filled in, every field checked),
`prepared` (what waits in the queue), `call_arguments` and `sampling` (what the pipeline is
called with), `denoise` (the call in numbered steps), `progress` (each step handed to the
requests in a call), `infotext` (A1111's parameters text), `images` and `masks`, and
`upscaling` (an upscale's preparation and run)."""
