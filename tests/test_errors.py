"""graphopt.errors.reason: another tool's message as one readable line."""

from __future__ import annotations

from graphopt.errors import reason


def test_colour_codes_are_removed_and_only_the_first_line_is_kept():
    exc = RuntimeError("\x1b[1;31m[E:onnxruntime:, inference_session.cc] cannot load\x1b[m\nstack frame 1\n")
    assert reason(exc) == "[E:onnxruntime:, inference_session.cc] cannot load"


def test_long_text_is_cut_at_a_word_boundary():
    assert reason(ValueError("alpha beta gamma delta"), 12) == "alpha beta …"


def test_an_empty_message_names_the_exception_type():
    assert reason(KeyError()) == "KeyError"
