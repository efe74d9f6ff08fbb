"""Reading a prompt: A1111's emphasis syntax and its chunking rules, without a model.

The parser cases are the results of A1111's own `parse_prompt_attention` (its documented
examples), carried over as facts."""

from __future__ import annotations

import pytest

from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.prompts.reader import CHUNK_TOKENS, PromptReader, chunk_tokens
from backends.sdxl_backend.prompts.weights import MAX_NESTING, parse_attention, parse_comfyui
from models.tiny import make_tokenizer

A1111_PARSES = [
    ("(a fox:1.0)", [("a fox", 1.0)]),
    ("((fox))", [("fox", 1.2100000000000002)]),
    ("[fox]", [("fox", 0.9090909090909091)]),
    ("(a fox:1.3)", [("a fox", 1.3)]),
    ("a fox, (a hat:1.0), a tree", [("a fox, a hat, a tree", 1.0)]),
    ("a fox BREAK a hat", [("a fox", 1.0), ("BREAK", -1), ("a hat", 1.0)]),
    ("\\(a fox\\)", [("(a fox)", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (")x", [(")x", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "pieces"), A1111_PARSES)
def test_parse_matches_a1111(prompt, pieces):
    parsed = parse_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in pieces]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in pieces])


# ComfyUI's CLIPTextEncode (comfy/sd1_clip.py's token_weights): an explicit weight replaces the
# brackets' 1.1s instead of multiplying them; square brackets and BREAK are text.
COMFYUI_PARSES = [
    ("(a fox:1.0)", [("a fox", 1.0)]),
    ("((fox))", [("fox", 1.2100000000000002)]),
    ("((fox:1.5))", [("fox", 1.5)]),
    ("(a (fox:0.5) hat)", [("a ", 1.1), ("fox", 0.5), (" hat", 1.1)]),
    ("[fox] BREAK a hat", [("[fox] BREAK a hat", 1.0)]),
    ("\\(a fox\\)", [("(a fox)", 1.0)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("(unbalanced", [("(unbalanced", 1.0)]),
    (")x (y)", [(")x (y)", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "pieces"), COMFYUI_PARSES)
def test_parse_matches_comfyui(prompt, pieces):
    parsed = parse_comfyui(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in pieces]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in pieces])


def test_comfyuis_chunks_take_whole_words_and_cut_only_long_ones():
    """74 one-token words, then a 3-token word: it moves whole to the next chunk (A1111 would
    cut it); a word of 8 tokens or more is cut at the chunk's end."""
    reader = PromptReader(lambda: [make_tokenizer()])
    short = reader.read(" ".join(["a"] * 74) + " abc", style="comfyui").chunks[0]
    assert [content(chunk) for chunk in short] == [74, 3] and short[0].rule == "comfyui"
    long = reader.read(" ".join(["a"] * 74) + " abcdefghij", style="comfyui").chunks[0]
    assert [content(chunk) for chunk in long] == [75, 9]
    a1111 = reader.read(" ".join(["a"] * 74) + " abc").chunks[0]
    assert [content(chunk) for chunk in a1111] == [75, 2] and a1111[0].rule == "a1111"
    weighted = reader.read("(ab:1.5) c", style="comfyui").chunks[0][0]
    assert weighted.weights[1:5] == (1.5, 1.5, 1.0, 1.0) and weighted.weighted  # (the space is no token)


def test_brackets_nested_past_the_bound_are_a_400_not_a_crash():
    reader = PromptReader(lambda: [make_tokenizer()])
    deep = "(" * (MAX_NESTING + 1) + "a" + ")" * (MAX_NESTING + 1)
    with pytest.raises(InvalidRequest) as refused:
        reader.read(deep, "prompt", style="comfyui")
    assert refused.value.param == "prompt" and "nested" in refused.value.message
    with pytest.raises(InvalidRequest, match="not a weight"):
        reader.read("(a:1e9)", "prompt", style="comfyui")


def tokens(count: int, comma_at: int | None = None) -> list[tuple[int, float]]:
    tokenizer = make_tokenizer()
    word, comma = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids(",</w>")
    return [(comma if index == comma_at else word, 1.0) for index in range(count)]


def content(chunk) -> int:
    """Tokens between the start token and the end token."""
    return chunk.ids.index(make_tokenizer().eos_token_id) - 1


def test_chunks_of_75_tokens_each_with_start_end_and_padding():
    tokenizer = make_tokenizer()
    assert [content(chunk) for chunk in chunk_tokens(tokens(160), tokenizer)] == [75, 75, 10]
    for chunk in chunk_tokens(tokens(160), tokenizer):
        assert len(chunk.ids) == len(chunk.weights) == CHUNK_TOKENS + 2 and chunk.ids[0] == tokenizer.bos_token_id
    (empty,) = chunk_tokens([], tokenizer)
    assert empty.ids[:2] == (tokenizer.bos_token_id, tokenizer.eos_token_id) and not empty.weighted


def test_a_full_chunk_is_cut_after_a_comma_among_its_last_20_tokens():
    tokenizer = make_tokenizer()
    assert [content(c) for c in chunk_tokens(tokens(80, comma_at=60), tokenizer)] == [61, 19]  # cut after the comma
    assert [content(c) for c in chunk_tokens(tokens(80, comma_at=50), tokenizer)] == [75, 5]  # too far back


def test_break_ends_a_chunk_and_weights_follow_their_tokens():
    reader = PromptReader(lambda: [make_tokenizer()])
    read = reader.read("ab BREAK (cd:1.5)")
    assert read.chunk_count == 2 and read.tokens == 4
    first, second = read.chunks[0]
    assert content(first) == 2 and not first.weighted
    assert second.weights[1:3] == (1.5, 1.5) and second.weights[3] == 1.0
    assert reader.pad(read, 3).chunk_count == 3 and reader.pad(read, 1) is read
    reader.syntax = "plain"
    assert reader.read("(cd:1.5)").tokens == len("(cd:1.5)") and not reader.read("(cd:1.5)").chunks[0][0].weighted


@pytest.mark.parametrize(
    ("prompt", "why"),
    [
        ("(a:.)", "'.' is not a number"),
        ("(a:1.2.3)", "'1.2.3' is not a number"),
        ("((a:..))", "'..' is not a number"),
        ("(a:1e12)", "'1e12' is not a weight between -10 and 10"),
        ("(a:1000000000000)", "is not a weight between -10 and 10"),
        ("(a:nan)", "'nan' is not a weight"),
        ("(a:-inf)", "'-inf' is not a weight"),
    ],
)
def test_a_weight_that_is_no_usable_number_is_a_400_naming_the_field(prompt, why):
    reader = PromptReader(lambda: [make_tokenizer()])
    with pytest.raises(InvalidRequest, match=why) as refused:
        reader.read(prompt, "negative_prompt")
    assert refused.value.param == "negative_prompt"
    assert parse_attention("(a:1e1)") == [("a", 10.0)] and parse_attention("(a:-2.5)") == [("a", -2.5)]
    assert parse_attention("(a:Nancy)") == [("a:Nancy", 1.1)]  # (a word is text, as in A1111)
