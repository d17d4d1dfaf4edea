"""The quiet console of `kubetune run` against its run log: what a person sees, what is kept."""

from __future__ import annotations

import io
import logging

import pytest

from kubetune import console


@pytest.fixture
def console_and_log():
    """A library's logger with a console handler (first, as MLflow's own is) and the run log's."""
    logger = logging.getLogger("mlflow.store.db.utils.kubetune-test")
    screen, log_file = io.StringIO(), io.StringIO()
    shown, kept = logging.StreamHandler(screen), logging.StreamHandler(log_file)
    shown.setFormatter(console.WithoutTracebacks(logging.Formatter("%(levelname)s %(name)s: %(message)s")))
    kept.setFormatter(logging.Formatter(console.LOG_FORMAT))
    logger.addHandler(shown)
    logger.addHandler(kept)
    logger.propagate = False
    try:
        yield logger, screen, log_file
    finally:
        logger.removeHandler(shown)
        logger.removeHandler(kept)
        logger.propagate = True


def _store_error() -> Exception:
    try:
        raise OSError("unable to open database file")
    except OSError as exc:
        return exc


def test_a_library_error_with_a_traceback_shows_its_first_line_and_the_run_log_keeps_it_all(console_and_log):
    logger, screen, log_file = console_and_log
    console.setup()  # the masking record factory, as the CLI has it
    error = _store_error()
    logger.error("SQLAlchemy database error. The following exception is caught.\n%s\n[SQL: SELECT 1]", error,
                 exc_info=error)
    assert screen.getvalue() == ("ERROR mlflow.store.db.utils.kubetune-test: SQLAlchemy database error. "
                                 "The following exception is caught.\n")
    kept = log_file.getvalue()
    assert "Traceback (most recent call last)" in kept and "[SQL: SELECT 1]" in kept
    assert "OSError: unable to open database file" in kept


def test_a_record_without_an_exception_is_shown_whole(console_and_log):
    logger, screen, _ = console_and_log
    logger.warning("two\nlines")
    assert screen.getvalue() == "WARNING mlflow.store.db.utils.kubetune-test: two\nlines\n"


def test_a_stack_trace_is_left_to_the_log_too(console_and_log):
    logger, screen, log_file = console_and_log
    logger.warning("deprecated", stack_info=True)
    assert screen.getvalue() == "WARNING mlflow.store.db.utils.kubetune-test: deprecated\n"
    assert "Stack (most recent call last)" in log_file.getvalue()
