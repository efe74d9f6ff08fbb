"""Inpainting masks: white repaints, black keeps (AUTOMATIC1111's and diffusers' convention).

A mask is prepared once, before queueing: resized to the output, inverted if asked, blurred
(soft edges, as A1111's `mask_blur`). The pipeline repaints under it and the original is laid
back over everything the mask keeps, so pixels outside it come back exactly as they were.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int, invert: bool) -> Image.Image:
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask


def mask_from_alpha(image: Image.Image) -> Image.Image:
    """OpenAI's convention: the fully transparent pixels of a PNG are the ones to edit."""
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the area to repaint starts from the colours around it, spread inwards,
    instead of from what was there. Each pass blurs the kept pixels and their coverage at one
    scale (shrunk, grown back) and divides, giving the mean kept colour nearby; finer passes
    overwrite coarser ones wherever they reach."""
    width, height = image.size
    keep = 1.0 - np.asarray(mask, dtype=np.float32) / 255.0
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    kept_colour = pixels * keep[..., None]
    filled = np.zeros_like(pixels)

    def blur(plane: np.ndarray, small: tuple[int, int]) -> np.ndarray:
        shrunk = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(small, Image.Resampling.BOX)
        return np.asarray(shrunk.resize((width, height), Image.Resampling.BILINEAR))

    for factor in (64, 16, 4, 1):
        small = (max(1, width // factor), max(1, height // factor))
        coverage = blur(keep, small)
        reached = coverage > 1e-3
        colour = np.stack([blur(kept_colour[..., channel], small) for channel in range(3)], axis=-1)
        filled[reached] = colour[reached] / coverage[reached, None]
    weight = 1.0 - keep[..., None]
    blended = pixels * (1.0 - weight) + filled * weight
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def outpainted(image: Image.Image, margins: tuple[int, int, int, int], fill: str) -> tuple[Image.Image, Image.Image]:
    """The image grown by (left, top, right, bottom) pixels, and the mask of the new area
    (white: to paint). The new area starts from the colours around it ("fill", A1111's), or
    from the image's border pixels stretched outwards ("edge")."""
    left, top, right, bottom = margins
    pixels = np.asarray(image.convert("RGB"))
    grown = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(grown.shape[:2], 255, dtype=np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    mask_image = Image.fromarray(mask, mode="L")
    canvas = Image.fromarray(grown)
    return (fill_masked(canvas, mask_image) if fill == "fill" else canvas), mask_image
