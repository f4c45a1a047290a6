"""Fixtures of the CLI tests (defined in cli_stages.py)."""

from cli_stages import stages  # noqa: F401  (registers the session fixture)
