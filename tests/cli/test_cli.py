"""The `vq2pc` command line through `vq2pc.cli.main`: help texts, one-line errors, the stage verbs chained."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vq2pc.cli import build_parser, main

VERBS = [
    "run",
    "train-vqvae",
    "train-prior",
    "train-baseline",
    "distill",
    "finetune",
    "evaluate",
    "usage",
    "sample",
    "inpaint",
    "classify",
    "refine",
    "distill-tree",
    "mix-trees",
    "export",
    "compress",
    "decompress",
]
DATA = ["--limit", "100", "--seed", "0"]


def squash(text: str) -> str:
    """Whitespace-normalized text (argparse re-wraps paragraphs to the terminal width)."""
    return " ".join(text.split())


def verb_parsers() -> dict[str, Any]:
    """The sub-parser of every verb, by name."""
    parser = build_parser()
    return dict(parser._subparsers._group_actions[0].choices)  # argparse has no public accessor


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` -> (exit code, stdout, stderr); ``--help`` exits through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def test_top_level_help_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    assert "Distill a VQ-VAE into a tractable probabilistic circuit" in squash(out)
    for verb in VERBS:
        assert f"    {verb}" in out, verb
    assert set(verb_parsers()) == set(VERBS)


def test_no_verb_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([], capsys)
    assert code == 2 and "usage: vq2pc" in out


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_prints_its_description(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    description = verb_parsers()[verb].description
    code, out, _ = run_cli([verb, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: vq2pc {verb}")
    assert description, f"`vq2pc {verb}` has no description"
    assert squash(description) in squash(out)


def test_missing_config_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["run", "--config", "nonexistent.yaml"], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vq2pc run: error: ") and "nonexistent.yaml" in lines[0]
    assert "Traceback" not in err
