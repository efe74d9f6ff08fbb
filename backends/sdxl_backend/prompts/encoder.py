"""The prompt encoder: read prompts (reader.py) become SDXL's conditioning, on the device thread.

Every task hands the pipelines embeddings made here, never a prompt string:

1. each chunk of each prompt goes through each text encoder of the model (CLIP-L and
   OpenCLIP-G; a refiner has the second only), all chunks of a call in one batch;
2. the hidden states of the layer `clip_skip` names are kept, counted from the last (2, the
   penultimate, is what SDXL was trained on; Forge's and diffusers' reading: both encoders
   alike, no final layer norm), weighted by the chunk's rule: A1111's, each token's state
   times its weight, then the chunk rescaled to its unweighted mean; or ComfyUI's, each
   token's state moved from the empty prompt's by its weight, (z - z_empty) x w + z_empty (a
   chunk whose weights are all 1.0 is left exactly as encoded either way);
3. a prompt's chunks are joined along the sequence (77 tokens each), the encoders' states
   side by side (768 + 1280 = 2048 per token);
4. the pooled embedding is OpenCLIP-G's, of the first chunk (its projected state at the first
   end token, located here: an embedding's ids, past the vocabulary, would mislead a model
   config that looks for the end token as the highest id);
5. an empty negative prompt is zeros when the model asks for it (`force_zeros_for_empty_prompt`,
   as SDXL base was trained), like diffusers does.

Each prompt is encoded on its own (no statistic is shared across a batch), so an image's
conditioning does not depend on what shares its call. A model keeps the encodings of the
prompts it read last (`EncodedPrompts`): a gallery re-running a prompt skips the encoders, and a
batch encodes each distinct prompt once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from backends.sdxl_backend.device_thread import TORCH_WORK
from backends.sdxl_backend.prompts.embeddings import EmbeddingSet
from backends.sdxl_backend.prompts.reader import ReadPrompt, ReadPrompts, close_chunk


def text_encoders(pipeline: Any) -> list[tuple[Any, Any, str]]:
    """(encoder, its tokenizer, its part of an embedding file) for each text encoder: transformers'
    CLIP text models (whose embedding tables are swapped, so read as Any) and their tokenizers."""
    return [
        (encoder, tokenizer, key)
        for encoder, tokenizer, key in (
            (pipeline.text_encoder, pipeline.tokenizer, "clip_l"),
            (pipeline.text_encoder_2, pipeline.tokenizer_2, "clip_g"),
        )
        if encoder is not None
    ]


class TokensAndEmbeddings(torch.nn.Module):
    """A text encoder's token table, and past its vocabulary the served embeddings' vectors.
    The table stays the module it was (memory modes' offload hooks act on it as before); the
    vectors are a small buffer of their own."""

    def __init__(self, table: torch.nn.Embedding, vocabulary: int, vectors: torch.Tensor):
        super().__init__()
        self.table, self.vocabulary = table, vocabulary
        self.vectors: torch.Tensor
        self.register_buffer("vectors", vectors, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states = self.table(ids.clamp(max=self.vocabulary - 1))
        extra = ids >= self.vocabulary
        if extra.any():
            vectors = self.vectors.to(device=states.device, dtype=states.dtype)
            states = torch.where(extra[..., None], vectors[(ids - self.vocabulary).clamp(min=0)], states)
        return states


def give_embeddings(pipeline: Any, embeddings: EmbeddingSet) -> None:
    """Each text encoder reads the served embeddings' vectors at the ids the prompt reader
    writes for them (past its tokenizer's vocabulary)."""
    from safetensors.torch import load_file

    TORCH_WORK.note("load")
    files = {embedding_id: load_file(embedding.file) for embedding_id, embedding in embeddings.embeddings.items()}
    for encoder, tokenizer, key in text_encoders(pipeline):
        table = encoder.get_input_embeddings()
        if isinstance(table, TokensAndEmbeddings):  # (given before: the vectors are replaced)
            table = table.table
        vectors = torch.zeros(embeddings.total, table.embedding_dim)
        for embedding_id, tensors in files.items():
            start = embeddings.offsets[embedding_id]
            vectors[start : start + len(tensors[key])] = tensors[key]
        encoder.set_input_embeddings(TokensAndEmbeddings(table, len(tokenizer), vectors))


@torch.no_grad()
def encode(pipeline: Any, prompts: list[ReadPrompt], clip_skip: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [prompts, 77 x chunks, width], pooled [prompts, 1280]) of prompts of one
    chunk count, encoded by `pipeline`'s text encoders, read at layer `clip_skip` from the last."""
    TORCH_WORK.note("encode prompts")
    device = pipeline._execution_device
    per_encoder, pooled = [], None
    for index, (encoder, tokenizer, _) in enumerate(text_encoders(pipeline)):
        chunks = [chunk for prompt in prompts for chunk in prompt.chunks[index]]
        ids = torch.tensor([chunk.ids for chunk in chunks], device=device)
        output = encoder(ids, output_hidden_states=True)
        states = output.hidden_states[-clip_skip]
        empty = None  # the empty prompt's states at the same layer, for ComfyUI's rule
        for row, chunk in enumerate(chunks):
            if not chunk.weighted:
                continue
            weights = torch.tensor(chunk.weights, device=device, dtype=states.dtype)[:, None]
            if chunk.rule == "comfyui":  # ComfyUI's: each token moved from the empty prompt's state
                if empty is None:
                    empty_ids = torch.tensor([close_chunk([], tokenizer).ids], device=device)
                    empty = encoder(empty_ids, output_hidden_states=True).hidden_states[-clip_skip][0]
                moved = (states[row] - empty) * weights + empty
                states[row] = torch.where(weights != 1.0, moved, states[row])  # (only where weighted: exact)
            else:  # A1111's emphasis: weigh each token, then keep the chunk's mean
                before = states[row].mean()
                states[row] *= weights
                states[row] *= before / states[row].mean()
        count = len(chunks) // len(prompts)
        per_encoder.append(states.reshape(len(prompts), count * states.shape[1], states.shape[2]))
        if hasattr(encoder, "text_projection"):  # the pooled embedding, of each first chunk
            first = ids[::count]
            ends = (first == tokenizer.eos_token_id).int().argmax(dim=-1)
            pooled = encoder.text_projection(output.last_hidden_state[::count][torch.arange(len(first)), ends])
    if pooled is None:
        raise ValueError("no text encoder with a projection (OpenCLIP-G): not an SDXL pipeline")
    return torch.cat(per_encoder, dim=-1), pooled


class EncodedPrompts:
    """A loaded model's encodings of the prompts it read last, the least recently used going
    first past `size`. Keyed by the LoRAs active (theirs may change the text encoders), the
    layer read (clip skip) and the prompt's chunks (its tokens and weights: the prompt as read)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.has_embeddings = False  # whether the model's text encoders hold the served embeddings

    def encode(
        self, pipeline: Any, prompts: list[ReadPrompt], loras: tuple, clip_skip: int = 2
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `encode`, each distinct prompt encoded once, and only when not held already."""
        keyed = {(loras, clip_skip, prompt.chunks): prompt for prompt in prompts}
        missing = [key for key in keyed if key not in self._entries]
        if missing:
            states, pooled = encode(pipeline, [keyed[key] for key in missing], clip_skip)
            for row, key in enumerate(missing):
                self._entries[key] = (states[row].clone(), pooled[row].clone())
        keys = [(loras, clip_skip, prompt.chunks) for prompt in prompts]
        for key in keys:
            self._entries.move_to_end(key)
        rows = [self._entries[key] for key in keys]
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return torch.stack([states for states, _ in rows]), torch.stack([pooled for _, pooled in rows])

    def __len__(self) -> int:
        return len(self._entries)


def conditioning(
    pipeline: Any,
    reads: list[ReadPrompts],
    encoded: EncodedPrompts,
    loras: tuple = (),
    embeddings: EmbeddingSet | None = None,
    clip_skip: int = 2,
) -> dict[str, torch.Tensor]:
    """The pipeline call's four conditioning arguments for its rows, one `ReadPrompts` each;
    `loras`: the (id, weight) of the LoRAs active; `embeddings`: those the model serves;
    `clip_skip`: the layer read, counted from the last."""
    if embeddings is not None and embeddings.embeddings and not encoded.has_embeddings:
        give_embeddings(pipeline, embeddings)
        encoded.has_embeddings = True
    embeds, pooled = encoded.encode(pipeline, [read.prompt for read in reads], loras, clip_skip)
    zeros = [not read.negative.text for read in reads] if pipeline.config.get("force_zeros_for_empty_prompt") else []
    if zeros and all(zeros):
        negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = encoded.encode(pipeline, [read.negative for read in reads], loras, clip_skip)
        for row, zero in enumerate(zeros):
            if zero:
                negative_embeds[row], negative_pooled[row] = 0, 0
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": negative_embeds,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


class ConditioningSchedule:
    """A call's conditionings when its prompts are scheduled (prompt editing, alternation): one
    per run of steps, each distinct prompt encoded once (through the model's `EncodedPrompts`),
    swapped into the pipeline's tensors between two steps, as A1111 swaps them."""

    def __init__(self, reads: ReadPrompts, rows: int, guided: bool, encode: Callable[[list[ReadPrompts]], dict]):
        self.guided = guided  # (classifier-free guidance: the pipeline keeps unconditional rows first)
        self.entries = [(end, encode([scheduled] * rows)) for end, scheduled in reads.schedule]

    def swap(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """The conditioning of denoising step `step` (counted from 0, each call of the model
        one), into `tensors` (the pipeline's, which keep the unconditional rows first)."""
        entry = next((cond for end, cond in self.entries if step <= end), self.entries[-1][1])
        for name, positive, negative in (
            ("prompt_embeds", "prompt_embeds", "negative_prompt_embeds"),
            ("add_text_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        ):
            value = torch.cat([entry[negative], entry[positive]]) if self.guided else entry[positive]
            tensors[name] = value.to(device=tensors[name].device, dtype=tensors[name].dtype)
