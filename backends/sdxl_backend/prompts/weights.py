"""A prompt's weights, read by A1111's rule (`parse_attention`) or ComfyUI's (`parse_comfyui`):
the text as (text, weight) pieces. What each rule reads is told in reader.py, which cuts the
pieces into chunks."""

from __future__ import annotations

import math
import re

BREAK = -1.0  # the weight that marks a BREAK among the parsed pieces
UP, DOWN = 1.1, 1 / 1.1

MAX_WEIGHT = 10.0  # |weight| at most this; A1111 takes any float, but past it a picture is noise
# One lexical piece each: an escape, a bracket, a closing weight (":1.3)", or what looks like one:
# "1e3", "nan", "1.2.3" are refused, not read as text), text, a colon.
PIECE = re.compile(
    r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?(?:[.\d]+(?:e[+-]?\d+)?|nan|inf(?:inity)?))\s*\)|\)|]|[^\\()\[\]:]+|:",
    re.IGNORECASE,
)


class BadWeight(ValueError):
    """A closing weight that is no number, or none a prompt can use."""


BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
MAX_NESTING = 100  # brackets inside brackets: a bound on the reader's recursion


def parse_attention(text: str) -> list[tuple[str, float]]:  # noqa: C901 (one pass, a branch per kind of piece)
    """The prompt as (text, weight) pieces, neighbours of equal weight merged; a BREAK is the
    piece ("BREAK", -1)."""
    pieces: list[list] = []  # [text, weight], weights multiplied as brackets close
    open_round: list[int] = []  # where each open bracket's text starts
    open_square: list[int] = []

    def weigh_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in PIECE.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            pieces.append([piece[1], 1.0])
        elif piece == "(":
            open_round.append(len(pieces))
        elif piece == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            weigh_from(open_round.pop(), parse_weight(weight))
        elif piece == ")" and open_round:
            weigh_from(open_round.pop(), UP)
        elif piece == "]" and open_square:
            weigh_from(open_square.pop(), DOWN)
        else:
            for index, part in enumerate(BREAK_WORD.split(piece)):
                if index:
                    pieces.append(["BREAK", BREAK])
                pieces.append([part, 1.0])
    for start in open_round:
        weigh_from(start, UP)
    for start in open_square:
        weigh_from(start, DOWN)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight and weight != BREAK:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        elif piece_text or weight == BREAK:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def parse_weight(text: str) -> float:
    """An emphasis weight: a finite number within +-MAX_WEIGHT, else `BadWeight`."""
    try:
        weight = float(text)
    except ValueError:
        raise BadWeight(f"'{text}' is not a number") from None
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise BadWeight(f"'{text}' is not a weight between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return weight


def parse_comfyui(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) pieces by ComfyUI's rule (see the module's docstring)."""
    escaped = text.replace("\\\\", "\x02").replace("\\(", "\x00").replace("\\)", "\x01")
    depth = deepest = 0
    for char in escaped:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise BadWeight(f"brackets nested {deepest} deep (at most {MAX_NESTING})")

    def unescape(piece: str) -> str:
        return piece.replace("\x00", "(").replace("\x01", ")").replace("\x02", "\\")

    return [(unescape(piece), weight) for piece, weight in _comfyui_weights(escaped, 1.0)]


def _comfyui_groups(text: str) -> list[str]:
    """The text cut at its outermost brackets: plain runs and "(...)" groups (a stray closing
    bracket stays in the text around it, as ComfyUI leaves it)."""
    groups, current, depth = [], "", 0
    for char in text:
        if char == "(" and depth == 0 and current:
            groups.append(current)
            current = ""
        current += char
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == ")" and depth == 0:
            groups.append(current)
            current = ""
    return [*groups, current] if current else groups


def _comfyui_weights(text: str, weight: float) -> list[tuple[str, float]]:
    pieces: list[tuple[str, float]] = []
    for group in _comfyui_groups(text):
        if not (len(group) >= 2 and group[0] == "(" and group[-1] == ")"):
            pieces.append((group, weight))
            continue
        inner, inner_weight = group[1:-1], weight * UP
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner_weight = float(inner[colon + 1 :])
                inner = inner[:colon]
            except ValueError:
                pass  # (not a number: the colon is text, the group weighs 1.1)
            if not math.isfinite(inner_weight) or abs(inner_weight) > MAX_WEIGHT:
                raise BadWeight(f"'{inner[colon + 1 :]}' is not a weight between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
        pieces += _comfyui_weights(inner, inner_weight)
    return pieces
