"""graphopt.errors: another tool's message as one readable line; missing extras."""

from __future__ import annotations

import pytest

from graphopt.errors import reason


def test_colour_codes_are_removed_and_only_the_first_line_is_kept():
    exc = RuntimeError("\x1b[1;31m[E:onnxruntime:, inference_session.cc] cannot load\x1b[m\nstack frame 1\n")
    assert reason(exc) == "[E:onnxruntime:, inference_session.cc] cannot load"


def test_long_text_is_cut_at_a_word_boundary():
    assert reason(ValueError("alpha beta gamma delta"), 12) == "alpha beta …"


def test_an_empty_message_names_the_exception_type():
    assert reason(KeyError()) == "KeyError"


def test_a_missing_extra_is_bad_input_naming_what_installs_it():
    from graphopt.errors import EXIT_BAD_INPUT, MissingExtraError, require_extra

    with pytest.raises(MissingExtraError) as caught:
        require_extra("graphopt_no_such_package.sub", extra="llm", purpose="fuse-decoder")
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert str(caught.value).startswith("fuse-decoder needs graphopt_no_such_package: pip install 'graphopt[llm]'")
    assert require_extra("json", extra="none", purpose="test").dumps([1]) == "[1]"
