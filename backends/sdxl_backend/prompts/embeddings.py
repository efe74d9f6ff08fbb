"""Textual-inversion embeddings: words that stand for learned vectors (plain Python here: the
store, the settings and the prompt reader use it without loading torch).

An SDXL embedding is a `.safetensors` file with two tensors, `clip_l` (n x 768) and `clip_g`
(n x 1280): n vectors for each text encoder. A prompt names it by its id (A1111's way, the bare
word) or as `embedding:id` (ComfyUI's), in the negative prompt too. It fits the models whose
text encoders have those widths (its `fits` label, "768+1280" for SDXL).

The served embeddings get token ids past each tokenizer's vocabulary, in a fixed order
(`EmbeddingSet`): the prompt reader writes those ids into the chunks, and the device thread
has each text encoder read the vectors for those ids (`encoder.give_embeddings`), once
per loaded model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

EMBEDDING_FILE = "embedding.safetensors"  # what a stored embedding's folder holds
SDXL_TEXT = "768+1280"  # SDXL's text encoder widths (CLIP-L, OpenCLIP-G)
KEYS = ("clip_l", "clip_g")


def model_text_signature(path: Path) -> str:
    """A stored pipeline's text encoder widths, "L+G" (a refiner, with OpenCLIP-G only: "+G")."""
    widths = []
    for folder in ("text_encoder", "text_encoder_2"):
        config = path / folder / "config.json"
        widths.append(str(json.loads(config.read_text())["hidden_size"]) if config.is_file() else "")
    return "+".join(widths)


def file_signature(file: Path) -> str | None:
    """An embedding file's widths, "L+G"; None when it is not an SDXL embedding."""
    from safetensors import safe_open

    with safe_open(file, framework="pt") as tensors:
        if sorted(tensors.keys()) != sorted(KEYS):
            return None
        shapes = [tensors.get_slice(key).get_shape() for key in KEYS]
    if any(len(shape) != 2 for shape in shapes) or shapes[0][0] != shapes[1][0]:
        return None
    return f"{shapes[0][1]}+{shapes[1][1]}"


def fits_model(fits: str, model_signature: str) -> bool:
    """Whether an embedding of widths `fits` serves a model's text encoders (a refiner uses its
    OpenCLIP-G part)."""
    clip_l, clip_g = fits.split("+")
    model_l, model_g = model_signature.split("+")
    return model_g == clip_g and model_l in ("", clip_l)


@dataclass(frozen=True)
class EmbeddingSource:
    id: str
    path: Path  # a folder holding EMBEDDING_FILE
    fits: str

    @property
    def file(self) -> Path:
        return self.path / EMBEDDING_FILE

    @cached_property
    def vectors(self) -> int:
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as tensors:
            return tensors.get_slice("clip_l").get_shape()[0]


class EmbeddingSet:
    """The served embeddings, each with its place past the vocabulary (the same in every
    process that serves the same set: the order is their ids'); with `model_signature`, a
    prompt may name only those that fit that model, at the same places."""

    def __init__(self, embeddings: Sequence[EmbeddingSource] = (), model_signature: str | None = None):
        ordered = sorted(embeddings, key=lambda embedding: embedding.id)
        self.all = ordered
        self.offsets: dict[str, int] = {}
        self.total = 0
        for embedding in ordered:
            self.offsets[embedding.id], self.total = self.total, self.total + embedding.vectors
        self.embeddings = {e.id: e for e in ordered if model_signature is None or fits_model(e.fits, model_signature)}
        names = sorted(self.embeddings, key=len, reverse=True)  # (the longest name first)
        self.pattern = (
            re.compile(r"(?<![\w.:-])(?:embedding:)?(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
            if names
            else None
        )

    def for_model(self, model_signature: str) -> EmbeddingSet:
        return EmbeddingSet(list(self.all), model_signature)

    def token_ids(self, embedding_id: str, vocabulary: int) -> tuple[int, ...]:
        """The ids a prompt's use of the embedding becomes, for a tokenizer of `vocabulary` ids."""
        start = vocabulary + self.offsets[embedding_id]
        return tuple(range(start, start + self.embeddings[embedding_id].vectors))
