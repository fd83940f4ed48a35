"""graphopt.progress: a bar on a terminal, plain periodic lines in a log, nothing when quiet."""

from __future__ import annotations

import logging

import pytest

from graphopt import progress as progress_module
from graphopt.progress import Progress, progress


@pytest.fixture
def graphopt_logger():
    logger = logging.getLogger("graphopt")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_a_log_gets_plain_lines_without_carriage_returns(graphopt_logger, monkeypatch, caplog, capsys):
    graphopt_logger.setLevel(logging.INFO)
    monkeypatch.setattr(progress_module, "LOG_EVERY_SECONDS", 0.0)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    with caplog.at_level(logging.INFO, logger="graphopt"):
        assert list(progress(range(3), "int8: alone in int8", unit="layer")) == [0, 1, 2]
    assert [r.getMessage() for r in caplog.records] == [
        "int8: alone in int8: 1/3 layers", "int8: alone in int8: 2/3 layers", "int8: alone in int8: 3/3 layers"]
    assert "\r" not in capsys.readouterr().err


def test_nothing_is_shown_when_graphopt_is_quieter_than_info(graphopt_logger, caplog):
    graphopt_logger.setLevel(logging.ERROR)
    with caplog.at_level(logging.ERROR, logger="graphopt"):
        with Progress("distill 1/3", 10, unit="batch") as bar:
            bar.update(5, loss="0.1")
    assert bar.mode == "off" and caplog.records == []


def test_disabled_progress_is_off_even_when_verbose(graphopt_logger):
    graphopt_logger.setLevel(logging.INFO)
    assert Progress("x", enabled=False).mode == "off"
