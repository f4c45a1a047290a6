"""The command line's vocabulary: every verb's --help names each default once, a concept has one flag in
every verb, older spellings still parse, and the verbs' defaults are the run config's."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from vq2pc import __version__
from vq2pc.circuit.finetune import FineTuneConfig
from vq2pc.circuit.refine import EMConfig
from vq2pc.cli import build_parser, main
from vq2pc.cli.finetune import finetune_config
from vq2pc.cli.options import FLAGS, HelpFormatter, train_config
from vq2pc.cli.train import _quantizer_opts
from vq2pc.pipeline.config import CircuitSpec, ExperimentSpec, ModelSpec, RunConfig

PARSER = build_parser()
VERBS: dict[str, argparse.ArgumentParser] = next(
    a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)
).choices
RETIRED = {flag for _, old in FLAGS.values() for flag in old}


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and a.dest != "help"]


def _help_line(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


def _meaningful(default: object) -> bool:
    return not any(default is v for v in (None, False, argparse.SUPPRESS)) and default != []


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_option_names_its_default_once(verb: str) -> None:
    parser = VERBS[verb]
    assert parser.formatter_class is HelpFormatter
    for action in _shown(parser):
        text = _help_line(parser, action)
        flag = "/".join(action.option_strings) or action.dest
        assert text.lower().count("default") <= 1, f"{verb} {flag}: {text!r}"
        switch = isinstance(action, argparse._StoreConstAction)  # store_true/false: its presence is the setting
        if action.option_strings and not action.required and not switch and _meaningful(action.default):
            assert "default" in text.lower() and str(action.default) in text, f"{verb} {flag}: {text!r}"


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_concept_has_one_flag_in_every_verb(verb: str) -> None:
    shown = _shown(VERBS[verb])
    for action in shown:
        assert not set(action.option_strings) & RETIRED, f"{verb} shows a retired flag {action.option_strings}"
        if action.dest in FLAGS:
            assert tuple(action.option_strings) == FLAGS[action.dest][0], f"{verb} {action.option_strings}"
    out = [a for a in shown if a.dest == "out"]
    assert len(out) <= 1 and all("write" in (a.help or "") for a in out)  # --out: the path the verb writes


def test_the_concepts_are_shared() -> None:
    """The shared flags really are shared: each one is taken by more than one verb."""
    for concept in ("N", "std_min", "std_max", "out", "seed", "device", "dataset", "data_dir", "limit"):
        verbs = [v for v, p in VERBS.items() if any(a.dest == concept for a in _shown(p))]
        assert len(verbs) >= 2, (concept, verbs)


def test_older_spellings_still_parse() -> None:
    a = PARSER.parse_args(["distill", "--vqvae", "v", "--prior", "p", "--N", "7", "--std-floor", "0.1"])
    b = PARSER.parse_args(["distill", "--vqvae", "v", "--prior", "p", "-N", "7", "--std-min", "0.1"])
    assert (a.N, a.std_min) == (b.N, b.std_min) == (7, 0.1)
    a = PARSER.parse_args(["sample", "c", "--n", "3", "--out", "s.png"])
    assert a.num_samples == PARSER.parse_args(["sample", "c", "--num-samples", "3", "--out", "s.png"]).num_samples == 3
    a = PARSER.parse_args(["refine", "c", "--min-std", "0.01", "--max-std", "0.5", "--out", "r"])
    assert (a.std_min, a.std_max) == (0.01, 0.5)
    assert PARSER.parse_args(["sample", "c", "--out", "s.png"]).num_samples == 64  # hidden aliases leave defaults be


def test_training_defaults_are_the_run_configs() -> None:
    run, model = RunConfig(), ModelSpec()
    a = PARSER.parse_args(["train-vqvae"])
    assert train_config(a) == dataclasses.replace(run.vqvae_train, seed=run.seed, device=run.device)
    assert (a.dataset, a.seed, a.device, a.leaf) == (run.dataset, run.seed, run.device, run.leaves[0])
    assert (a.latent_hw, a.K, a.D, a.hidden, a.res_blocks, a.beta, a.quantizer) == (
        model.latent_hw,
        model.K,
        model.D,
        model.hidden,
        model.res_blocks,
        model.beta,
        model.quantizer,
    )
    assert _quantizer_opts(a) == model.quantizer_opts
    assert _quantizer_opts(PARSER.parse_args(["train-vqvae", "--quantizer", "gumbel"])) == {}
    a = PARSER.parse_args(["train-prior", "--vqvae", "v"])
    assert train_config(a) == dataclasses.replace(run.prior_train, seed=run.seed, device=run.device)
    assert (a.prior, a.prior_hidden, a.prior_layers, a.prior_heads) == (
        model.prior,
        model.prior_hidden,
        model.prior_layers,
        model.prior_heads,
    )


def test_selection_finetune_and_refine_defaults_are_the_run_configs() -> None:
    run, model = RunConfig(), ModelSpec()
    a = PARSER.parse_args(["distill", "--vqvae", "v", "--prior", "p"])
    assert (a.starts, a.beam_score, a.beam_search, a.max_exhaustive, a.std_min) == (
        model.starts,
        model.beam_score,
        model.beam_search,
        run.max_exhaustive,
        model.std_floor,
    )
    a = PARSER.parse_args(["finetune", "--vqvae", "v", "--prior", "p"])
    assert a.N == PARSER.parse_args(["distill", "--vqvae", "v", "--prior", "p"]).N == max(model.N)
    assert finetune_config(a) == FineTuneConfig(seed=run.seed, device=run.device)
    a = PARSER.parse_args(["refine", "c", "--out", "r"])
    assert (a.em_iterations, a.em_leaves, a.em_prior_strength) == (
        model.em_iterations,
        model.em_leaves,
        model.em_prior_strength,
    )
    assert PARSER.parse_args(["evaluate", "c"]).bpd_draws == ExperimentSpec().bpd_draws
    assert PARSER.parse_args(["usage", "--prior", "p"]).max_usage_space == run.max_usage_space


RUN, MODEL = RunConfig(), ModelSpec()
SOURCES: dict[str, tuple[object, ...]] = {  # verb -> the configs whose settings its stage reads in `vq2pc run`
    "train-vqvae": (RUN, RUN.vqvae_train, MODEL),
    "train-prior": (RUN, RUN.prior_train, MODEL),
    "train-baseline": (RUN, RUN.baseline_train, CircuitSpec(), ExperimentSpec()),
    "distill": (RUN, MODEL),
    "finetune": (RUN, MODEL, FineTuneConfig()),
    "evaluate": (RUN, ExperimentSpec()),
    "usage": (RUN,),
    "refine": (RUN, MODEL, EMConfig()),
}


def _choices(annotation: object) -> list[object] | None:
    """The values of a ``Literal`` field (also under ``| None`` or ``Annotated``), else None."""
    for tp in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(tp) is typing.Literal:
            return list(typing.get_args(tp))
    return None


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_flag_of_a_config_field_has_the_fields_default_and_choices(verb: str) -> None:
    """Each flag made from a config field parses to the default of the config the verb's stage reads, and
    offers exactly the field's choices: a verb's default cannot disagree with the config's."""
    mapped = [a for a in VERBS[verb]._actions if hasattr(a, "setting")]
    assert len(mapped) >= len(SOURCES.get(verb, ())), verb  # every listed config gives this verb flags
    for action in mapped:
        owner, name = action.setting
        assert any(owner == s and type(owner) is type(s) for s in SOURCES.get(verb, (RUN,))), (verb, name)
        field = type(owner).__pydantic_fields__[name]
        assert action.default == getattr(owner, name), (verb, action.option_strings)
        others = [o for o in VERBS[verb]._actions if o.dest == action.dest and o is not action]
        assert all(o.default is argparse.SUPPRESS for o in others), (verb, name)  # hidden spellings keep it
        assert action.choices == _choices(field.annotation), (verb, action.option_strings)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"vq2pc {__version__}"
