"""A1111's prompt editing and alternation, read by hand from its grammar: each case is the
doctest of A1111's own `get_learned_conditioning_prompt_schedules` (10 steps), carried over as
facts, and its documented 100-step example."""

from __future__ import annotations

import pytest

from backends.sdxl_backend.prompts.schedules import schedule, text_at

A1111_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]),
    ("[fe|]male", [(step, "female" if step % 2 else "male") for step in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_SCHEDULES)
def test_schedules_match_a1111s(prompt, expected):
    assert schedule(prompt, 10) == expected


def test_a1111s_hundred_step_example():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][: in background:0.25] [shoddy:masterful:0.5]"
    )
    assert schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_when_with_a_decimal_point_is_a_fraction_and_without_one_a_step():
    assert schedule("[a:b:1.0]", 10) == [(10, "a")]  # the whole run
    assert schedule("[a:b:10]", 10) == [(10, "a")]  # step 10 of 10: likewise
    assert schedule("[a:b:0]", 10) == [(0, "a"), (10, "b")]  # step 0 reads a, then b (A1111's rule)
    assert schedule("[a:b:2]", 4) == [(2, "a"), (4, "b")] and schedule("[a:b:0.5]", 4) == [(2.0, "a"), (4, "b")]
    entries = schedule("[a:b:0.5]", 10)
    assert [text_at(entries, step) for step in range(10)] == ["a"] * 6 + ["b"] * 4  # steps 0-5, then 6-9
    assert schedule("a | b", 10) == [(10, "a | b")]  # (outside brackets the grammar refuses a |: plain text)
