"""A1111's prompt editing and alternation: `[from:to:when]`, `[to:when]`, `[from::when]` and
`[a|b|c]` make a prompt a schedule of plain prompts over the steps. This is A1111's grammar
(`modules/prompt_parser.py`, a lark grammar there) read by hand, and its rules:

- `when` with a decimal point is a fraction of the steps, without one a step number (A1111's
  timeline since 1.6; "0.5" of 10 steps is step 5, "1.0" all of them);
- the schedule is [(end step, prompt)]; denoising step i (counted from 0, each call of the
  model one) reads the first entry whose end step is i or later, so `[a:b:0.5]` over 10 steps
  is `a` for steps 0-5 and `b` for 6-9, as in A1111;
- an alternation takes its parts in turn, one a step: every step is a boundary;
- emphasis, BREAK and weights are left as text, for the prompt reader (reader.py) to read in
  each scheduled prompt;
- a prompt the grammar does not accept (an unclosed `[`, a `|` outside brackets) is one plain
  prompt for the whole run, as A1111 falls back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
PLAIN = re.compile(r"(?:[^\\\[\]():|\s]|\\.)+")
WHITESPACE = re.compile(r"\s+")
STRAY = "[]():"  # what the grammar lets stand alone at the top level


@dataclass(frozen=True)
class Scheduled:
    before: Prompt | None
    after: Prompt
    when: str  # as written: whether it has a decimal point decides its meaning


@dataclass(frozen=True)
class Alternate:
    parts: tuple[Prompt | None, ...]


@dataclass(frozen=True)
class Emphasized:
    opening: str
    inner: tuple[Prompt, ...]  # one prompt, or two around a ':' for "(text:weight)"
    closing: str


Node = Union[str, Scheduled, Alternate, Emphasized]  # noqa: UP007 (a string annotation would not resolve)
Prompt = tuple[Node, ...]


class Unparsed(ValueError):
    """The grammar does not accept the prompt: it is then one plain prompt."""


class _Reader:
    def __init__(self, text: str):
        self.text = text

    def prompt(self, at: int) -> tuple[Prompt, int]:
        """prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*"""
        nodes: list[Node] = []
        while at < len(self.text):
            found = self.item(at)
            if found is None:
                break
            node, at = found
            nodes.append(node)
        return tuple(nodes), at

    def item(self, at: int) -> tuple[Node, int] | None:
        for pattern in (PLAIN, WHITESPACE):
            match = pattern.match(self.text, at)
            if match:
                return match.group(0), match.end()
        if self.text.startswith("[", at):
            return self.scheduled(at) or self.alternate(at) or self.emphasized(at, "[", "]")
        if self.text.startswith("(", at):
            return self.emphasized(at, "(", ")")
        return None

    def scheduled(self, at: int) -> tuple[Node, int] | None:
        """'[' [prompt ':'] prompt ':' [WHITESPACE] NUMBER [WHITESPACE] ']'"""
        for with_before in (True, False):
            position = at + 1
            before = None
            if with_before:
                before, position = self.prompt(position)
                if not self.text.startswith(":", position):
                    continue
                position += 1
            after, position = self.prompt(position)
            if not self.text.startswith(":", position):
                continue
            position = self.skip_space(position + 1)
            number = NUMBER.match(self.text, position)
            if number is None:
                continue
            position = self.skip_space(number.end())
            if self.text.startswith("]", position):
                return Scheduled(before, after, number.group(0)), position + 1
        return None

    def alternate(self, at: int) -> tuple[Node, int] | None:
        """'[' prompt ('|' [prompt])+ ']'"""
        first, position = self.prompt(at + 1)
        parts: list[Prompt | None] = [first]
        while self.text.startswith("|", position):
            part, position = self.prompt(position + 1)
            parts.append(part or None)
        if len(parts) > 1 and self.text.startswith("]", position):
            return Alternate(tuple(parts)), position + 1
        return None

    def emphasized(self, at: int, opening: str, closing: str) -> tuple[Node, int] | None:
        """'(' prompt ')' | '(' prompt ':' prompt ')' | '[' prompt ']'"""
        inner, position = self.prompt(at + 1)
        parts = [inner]
        if opening == "(" and self.text.startswith(":", position):
            weight, position = self.prompt(position + 1)
            parts.append(weight)
        if self.text.startswith(closing, position):
            return Emphasized(opening, tuple(parts), closing), position + 1
        return None

    def skip_space(self, at: int) -> int:
        match = WHITESPACE.match(self.text, at)
        return match.end() if match else at

    def start(self) -> Prompt:
        """start: (prompt | /[][():]/+)*, the whole text or `Unparsed`."""
        nodes: list[Node] = []
        at = 0
        while at < len(self.text):
            prompt, at = self.prompt(at)
            nodes.extend(prompt)
            if at < len(self.text):
                if self.text[at] not in STRAY:
                    raise Unparsed(self.text)
                nodes.append(self.text[at])
                at += 1
        return tuple(nodes)


def parse(text: str) -> Prompt:
    return _Reader(text).start()


def schedule(text: str, steps: int) -> list[tuple[float, str]]:
    """[(end step, prompt)] of `text` over `steps` steps (A1111's get_learned_conditioning_
    schedules): one entry when nothing is scheduled."""
    try:
        tree = parse(text)
    except Unparsed:
        return [(steps, text)]
    boundaries = {float(steps)}
    _collect(tree, steps, boundaries)
    return [(end, _at_step(tree, end, steps)) for end in sorted(boundaries)]


def text_at(entries: list[tuple[float, str]], step: float) -> str:
    """The prompt a schedule gives step `step`: the first entry ending there or later."""
    return next((text for end, text in entries if step <= end), entries[-1][1])


def _when(node: Scheduled, steps: int) -> float:
    value = float(node.when)
    return value * steps if "." in node.when else value


def _collect(prompt: Prompt | None, steps: int, boundaries: set[float]) -> None:
    for node in prompt or ():
        if isinstance(node, Scheduled):
            if _when(node, steps) < steps:
                boundaries.add(_when(node, steps))
            _collect(node.before, steps, boundaries)
            _collect(node.after, steps, boundaries)
        elif isinstance(node, Alternate):
            boundaries.update(float(step) for step in range(1, steps + 1))
            for part in node.parts:
                _collect(part, steps, boundaries)
        elif isinstance(node, Emphasized):
            for inner in node.inner:
                _collect(inner, steps, boundaries)


def _at_step(prompt: Prompt | None, step: float, steps: int) -> str:
    """The plain prompt `prompt` is at `step` (A1111's AtStep transformer)."""
    text = []
    for node in prompt or ():
        if isinstance(node, str):
            text.append(node)
        elif isinstance(node, Scheduled):
            text.append(_at_step(node.before if step <= _when(node, steps) else node.after, step, steps))
        elif isinstance(node, Alternate):
            text.append(_at_step(node.parts[(int(step) - 1) % len(node.parts)], step, steps))
        else:
            text.append(node.opening + ":".join(_at_step(inner, step, steps) for inner in node.inner) + node.closing)
    return "".join(text)
