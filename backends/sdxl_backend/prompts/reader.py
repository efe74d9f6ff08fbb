"""What SDXL reads of a prompt: its A1111 emphasis parsed, then its tokens cut into chunks.

No torch here: this runs in the request's handler (`Engine.prepare`), so a prompt's token and
chunk counts are known before it is queued (a batch only takes requests of one chunk count)
and a prompt that uses syntax the server does not run is refused at once. The device thread's
`encoder.py` turns the chunks into embeddings.

Two rules, the request's `prompt_style` picking one. AUTOMATIC1111's (the default):

- `(text)` weighs 1.1, `((text))` 1.21, `[text]` 1/1.1, `(text:1.3)` 1.3; `\\(` `\\)` `\\[`
  `\\]` are literal brackets; a bracket left open weighs to the end of the prompt, a stray
  closing one is text, `(a:b)` is `a:b` at 1.1 (a weight must be a number);
- `BREAK` (a word of its own, in capitals) ends the chunk;
- chunks of 75 tokens, each encoded as start + 75 + end (padded); a chunk that fills up while
  its last comma is among its last 20 tokens is cut after that comma;
- prompt editing `[from:to:when]` and alternation `[a|b]` (A1111 changes the conditioning
  between steps) are refused by name rather than read as text;
- a served textual-inversion embedding named in a prompt (its id, or `embedding:id`) stands
  for its vectors, which a chunk never splits (embeddings.py).

ComfyUI's (`comfyui`, what its CLIPTextEncode does; the ComfyUI dialect asks for it):

- `(text)` weighs 1.1 times the weight around it and `(text:1.3)` weighs 1.3 outright (an
  explicit weight replaces, `((a:1.5))` is 1.5); `\\(` `\\)` are literal; `[text]` and `BREAK`
  are plain text, and there is no prompt editing;
- the text is split into words at spaces; chunks of 75 tokens take whole words, and only a word
  of 8 tokens or more is cut at a chunk's end (no comma rule);
- `embedding:id` stands for a served embedding's vectors (a bare id is a word; an unknown
  `embedding:` word is dropped, as ComfyUI drops it);
- a weight moves its token from the empty prompt's encoding rather than scaling it, with no
  mean restored (encoder.py; each chunk carries its rule).

With `SDXL_PROMPT_SYNTAX=plain` nothing is parsed (brackets are text); the chunks stay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.prompts.embeddings import EmbeddingSet
from backends.sdxl_backend.prompts.schedules import schedule, text_at
from backends.sdxl_backend.prompts.weights import BREAK, BadWeight, parse_attention, parse_comfyui

PromptSyntax = Literal["a1111", "plain"]
PromptStyle = Literal["a1111", "comfyui"]  # whose rule reads a request's brackets and weights
Token = int | tuple[int, ...] | None  # an id, an embedding's ids, or a BREAK
Tokenizer = Any  # a transformers CLIPTokenizer (read as Any: no torch or transformers imported here)
CHUNK_TOKENS = 75  # tokens of a chunk between its start and end tokens
COMMA_BACKTRACK = 20  # a full chunk is cut after a comma this close to its end
COMFYUI_LONG_WORD = 8  # ComfyUI cuts a word at a chunk's end only from this many tokens
COMFYUI_EMBEDDING = "embedding:"


@dataclass(frozen=True)
class Chunk:
    """One encoder input: start + 75 tokens + end, padded; each token's weight, and whose rule
    applies the weights (A1111's scale and mean restore, or ComfyUI's move from the empty prompt)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    rule: PromptStyle = "a1111"

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)


@dataclass(frozen=True)
class ReadPrompt:
    """A prompt as the text encoders will read it: its chunks for each tokenizer, and the
    number of tokens it has (start, end and padding not counted)."""

    text: str
    chunks: tuple[tuple[Chunk, ...], ...]  # per tokenizer: (CLIP-L, OpenCLIP-G), or the refiner's one
    tokens: int
    own_chunks: int  # the prompt's own, before any padding to its partner's count

    @property
    def chunk_count(self) -> int:
        return len(self.chunks[0])


@dataclass(frozen=True)
class ReadPrompts:
    """A request's prompt and negative prompt as one model reads them, of equal chunk counts.
    With prompt editing or alternation (schedules.py), `schedule` holds what each run of
    steps reads, [(end step, prompts)], the first entry's prompts being the two above; empty:
    every step reads the same."""

    prompt: ReadPrompt
    negative: ReadPrompt
    schedule: tuple[tuple[float, ReadPrompts], ...] = ()

    @property
    def chunk_count(self) -> int:
        return self.prompt.chunk_count


class PromptReader:
    """A model's tokenizers and the rules above: `read` turns a prompt into chunks."""

    def __init__(
        self, tokenizers: Callable[[], list], syntax: PromptSyntax = "a1111", embeddings: EmbeddingSet | None = None
    ):
        self._load = tokenizers  # called once, on first use
        self._tokenizers: list | None = None
        self.syntax = syntax
        self.embeddings = embeddings  # those the model's prompts may name
        self._lock = threading.Lock()  # (a tokenizer's cache is shared by the request threads)

    def tokenizers(self) -> list:
        with self._lock:
            if self._tokenizers is None:
                self._tokenizers = self._load()
            return self._tokenizers

    def read(self, text: str, field: str = "prompt", style: PromptStyle = "a1111") -> ReadPrompt:
        parse = parse_comfyui if style == "comfyui" else parse_attention
        try:
            pieces = parse(text) if self.syntax == "a1111" else [(text, 1.0)]
        except BadWeight as exc:
            raise InvalidRequest(f"{field}: a weight {exc} (as in (word:1.3))", field) from None
        tokenizers = self.tokenizers()
        with self._lock:
            if style == "comfyui":
                words = [self._tokenize_words(tokenizer, pieces) for tokenizer in tokenizers]
                tokenized = [[token for word in each for token in word] for each in words]
            else:
                tokenized = [self._tokenize(tokenizer, pieces) for tokenizer in tokenizers]
        if style == "comfyui":
            chunks = tuple(chunk_words(each, tokenizer) for each, tokenizer in zip(words, tokenizers))
        else:
            chunks = tuple(chunk_tokens(tokens, tokenizer) for tokens, tokenizer in zip(tokenized, tokenizers))
        tokens = sum(len(token) if isinstance(token, tuple) else 1 for token, _ in tokenized[0] if token is not None)
        return ReadPrompt(text, chunks, tokens, len(chunks[0]))

    def _tokenize_words(self, tokenizer: Tokenizer, pieces: list[tuple[str, float]]) -> list[list[tuple[Token, float]]]:
        """ComfyUI's tokens: each word (split at spaces) tokenized apart, an `embedding:id` word
        its embedding's ids (one token of them: it moves whole, like a word)."""
        embeddings = self.embeddings.embeddings if self.embeddings else {}
        words: list[list[tuple[Token, float]]] = []
        for text, weight in pieces:
            for word in text.replace("\n", " ").split(" "):
                if word.startswith(COMFYUI_EMBEDDING):
                    name = word.removeprefix(COMFYUI_EMBEDDING)
                    if name in embeddings and self.embeddings is not None:
                        words.append([(self.embeddings.token_ids(name, len(tokenizer)), weight)])
                elif word:
                    words.append([(token, weight) for token in tokenizer(word, add_special_tokens=False).input_ids])
        return words

    def _tokenize(self, tokenizer: Tokenizer, pieces: list[tuple[str, float]]) -> list[tuple[Token, float]]:
        """(token, weight) for each token: an id, or an embedding's ids (kept together); (None,
        BREAK) where a BREAK is."""
        embeddings = self.embeddings
        pattern = embeddings.pattern if embeddings else None
        tokens: list[tuple[Token, float]] = []
        for text, weight in pieces:
            if weight == BREAK:
                tokens.append((None, BREAK))
                continue
            for index, part in enumerate(pattern.split(text) if pattern else [text]):
                if index % 2 and embeddings:  # (what the pattern caught: an embedding's id)
                    tokens.append((embeddings.token_ids(part, len(tokenizer)), weight))
                elif part:
                    tokens += [(token, weight) for token in tokenizer(part, add_special_tokens=False).input_ids]
        return tokens

    def read_pair(self, prompt: str, negative: str, style: PromptStyle = "a1111") -> ReadPrompts:
        """Both prompts of a request, the shorter padded with empty chunks to the longer."""
        read, negative_read = self.read(prompt, "prompt", style), self.read(negative, "negative_prompt", style)
        count = max(read.chunk_count, negative_read.chunk_count)
        return ReadPrompts(self.pad(read, count), self.pad(negative_read, count))

    def read_scheduled(self, prompt: str, negative: str, steps: int, style: PromptStyle = "a1111") -> ReadPrompts:
        """Both prompts over `steps` steps: with prompt editing or alternation in either, each
        run of steps read apart, every entry padded to the longest (the conditioning swapped
        between steps keeps its shape). ComfyUI's rule has no prompt editing."""
        if self.syntax != "a1111" or style == "comfyui":
            return self.read_pair(prompt, negative, style)
        prompts, negatives = schedule(prompt, steps), schedule(negative, steps)
        if len(prompts) == len(negatives) == 1:  # (the same for every step: "[a:b:1.0]" is "a")
            return self.read_pair(prompts[0][1], negatives[0][1])
        entries = [
            (end, self.read_pair(text_at(prompts, end), text_at(negatives, end)))
            for end in sorted({end for end, _ in prompts + negatives})
        ]
        count = max(read.chunk_count for _, read in entries)
        padded = tuple(
            (end, ReadPrompts(self.pad(read.prompt, count), self.pad(read.negative, count))) for end, read in entries
        )
        return ReadPrompts(padded[0][1].prompt, padded[0][1].negative, padded)

    def pad(self, prompt: ReadPrompt, chunk_count: int) -> ReadPrompt:
        """The prompt with empty chunks after its own, up to `chunk_count` (a negative prompt is
        padded to its prompt's length, and the other way round)."""
        if prompt.chunk_count >= chunk_count:
            return prompt
        chunks = tuple(
            own + (chunk_tokens([], tokenizer)[0],) * (chunk_count - len(own))
            for own, tokenizer in zip(prompt.chunks, self.tokenizers())
        )
        return ReadPrompt(prompt.text, chunks, prompt.tokens, prompt.own_chunks)


def close_chunk(kept: list[tuple[int, float]], tokenizer: Tokenizer, rule: PromptStyle = "a1111") -> Chunk:
    """A chunk's tokens as the encoder reads them: start, the tokens, end, padding to 77."""
    padding = CHUNK_TOKENS - len(kept)
    ids = (tokenizer.bos_token_id, *(t for t, _ in kept), tokenizer.eos_token_id, *(tokenizer.pad_token_id,) * padding)
    return Chunk(ids, (1.0, *(w for _, w in kept), 1.0, *(1.0,) * padding), rule)


def chunk_tokens(tokens: list[tuple[Token, float]], tokenizer: Tokenizer) -> tuple[Chunk, ...]:
    """Chunks of at most 75 tokens: a BREAK ends one, a full one is cut after a late comma, an
    embedding that does not fit moves whole to the next; at least one chunk, even for none."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[Chunk] = []
    current: list[tuple[int, float]] = []
    last_comma = -1

    def close(kept: list[tuple[int, float]]) -> None:
        chunks.append(close_chunk(kept, tokenizer))

    for token, weight in tokens:
        if token is None:  # BREAK
            close(current)
            current, last_comma = [], -1
            continue
        if isinstance(token, tuple):  # an embedding's vectors
            if len(current) + len(token) > CHUNK_TOKENS:
                close(current)
                current, last_comma = [], -1
            current += [(vector, weight) for vector in token[:CHUNK_TOKENS]]
            continue
        if len(current) == CHUNK_TOKENS:
            if token != comma and last_comma >= 0 and len(current) - last_comma <= COMMA_BACKTRACK:
                close(current[: last_comma + 1])  # (the comma stays with the words before it)
                current = current[last_comma + 1 :]
            else:
                close(current)
                current = []
            last_comma = -1
        elif token == comma:
            last_comma = len(current)
        current.append((token, weight))
    if current or not chunks:
        close(current)
    return tuple(chunks)


def chunk_words(words: list[list[tuple[Token, float]]], tokenizer: Tokenizer) -> tuple[Chunk, ...]:
    """Chunks by ComfyUI's rule: whole words, a word that does not fit moving to the next chunk
    unless it is 8 tokens or longer (then it is cut); at least one chunk, even for none."""
    chunks: list[Chunk] = []
    current: list[tuple[int, float]] = []
    for word in words:
        tokens = [
            (vector, weight)
            for token, weight in word
            for vector in (token if isinstance(token, tuple) else (token,))
            if vector is not None
        ]
        long_word = len(tokens) >= COMFYUI_LONG_WORD
        while tokens:
            room = CHUNK_TOKENS - len(current)
            if len(tokens) <= room:
                current, tokens = current + tokens, []
                continue
            if long_word:
                current, tokens = current + tokens[:room], tokens[room:]
            chunks.append(close_chunk(current, tokenizer, "comfyui"))
            current = []
    chunks.append(close_chunk(current, tokenizer, "comfyui"))
    return tuple(chunks)


def model_tokenizers(model_path: Path) -> list:
    """A stored model's tokenizers (CLIP-L's and OpenCLIP-G's; a refiner has the second only),
    loaded without torch."""
    from transformers import CLIPTokenizer

    folders = [model_path / name for name in ("tokenizer", "tokenizer_2")]
    # (no length limit: prompts are cut into chunks here, never truncated by the tokenizer)
    return [CLIPTokenizer.from_pretrained(folder, model_max_length=2**31) for folder in folders if folder.is_dir()]
