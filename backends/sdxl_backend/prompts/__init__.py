"""Prompts, from text to what the UNet reads: `weights` (A1111's and ComfyUI's weight syntax),
`reader` (a prompt parsed and cut into chunks as each reads it), `schedules` (A1111's prompt
editing), `encoder` (both text encoders, clip skip, the weights applied) and `embeddings`
(textual inversion)."""
