"""The command line's shared vocabulary: one flag per concept across verbs, defaults from the run config.

A concept has one spelling in every verb that takes it: ``--components/-N`` (mixture size),
``--num-samples/-n`` (samples), ``--std-min/--std-max`` (Gaussian std bounds), ``--out`` (the path the
verb writes: a run directory for ``run``, the one file other verbs write), ``--seed``, ``--device``,
``--dataset``, ``--data-dir``, ``--limit``. Older spellings still parse, hidden from ``--help``.

A flag that sets a config field is made by :func:`setting` from the field's declaration
(:mod:`vq2pc.core.settings`): its default is the value in the config the verb's stage reads in ``vq2pc run``
(``RunConfig``, ``ModelSpec``, the ``TrainConfig`` s, ``FineTuneConfig``), its type and choices are the
field's, its help is the field's description. A verb's default cannot disagree with the config's.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from vq2pc.models.train import TrainConfig
from vq2pc.pipeline.config import ExperimentSpec, ModelSpec, RunConfig

RUN = RunConfig()
MODEL = ModelSpec()
EXPERIMENTS = ExperimentSpec()

# concept -> (flags shown in --help, older spellings that still parse); tests/cli/test_help.py checks every verb
FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "N": (("--components", "-N"), ("--N",)),
    "num_samples": (("--num-samples", "-n"), ("--n",)),
    "std_min": (("--std-min",), ("--std-floor", "--min-std")),
    "std_max": (("--std-max",), ("--max-std",)),
    "out": (("--out",), ()),
    "seed": (("--seed",), ()),
    "device": (("--device",), ()),
    "dataset": (("--dataset",), ()),
    "data_dir": (("--data-dir",), ()),
    "limit": (("--limit",), ()),
}


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help once: not when the help already names its default,
    not for defaults that say nothing (None, False, a suppressed option), not for switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings or action.required:
            return text
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.default == []:
            return text
        if isinstance(action, argparse._StoreConstAction):  # a switch (store_true/false): its presence is the setting
            return text
        return f"{text} (default: %(default)s)"


def add_parser(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A verb's parser with the shared help formatter."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def option(p: argparse.ArgumentParser, concept: str, **kwargs: Any) -> argparse.Action:
    """Add ``concept``'s option (its flags in :data:`FLAGS`), with its older spellings hidden."""
    shown, old = FLAGS[concept]
    action = p.add_argument(*shown, dest=concept, **kwargs)
    hidden = {k: v for k, v in kwargs.items() if k in ("type", "choices", "action", "nargs", "metavar")}
    for flag in old:
        p.add_argument(flag, dest=concept, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **hidden)
    return action


def out_option(p: argparse.ArgumentParser, what: str, **kwargs: Any) -> argparse.Action:
    """``--out``: the path the verb writes, ``what`` says which (a file, or the run directory)."""
    return option(p, "out", help=what, **kwargs)


def setting(
    p: argparse.ArgumentParser, owner: Any, name: str, *flags: str, concept: str | None = None, **kwargs: Any
) -> argparse.Action:
    """The flag of config field ``name``: default ``owner.name``, the field's type, choices and description.

    ``owner`` is a settings object, or a settings class (then the default is the field's). ``flags``
    default to ``--name`` (underscores as dashes); ``concept`` (or a ``name`` in :data:`FLAGS`) takes that
    concept's flags and destination. ``kwargs`` go to ``add_argument`` over the derived ones (e.g. ``help``
    with more to say). Unless ``kwargs`` replace the default, the action records ``(owner, name)`` as
    ``action.setting`` (tests/cli/test_help.py checks every one)."""
    info = (owner if isinstance(owner, type) else type(owner)).__pydantic_fields__[name]
    default = info.get_default(call_default_factory=True) if isinstance(owner, type) else getattr(owner, name)
    derived = {"default": default, "help": (info.description or name).replace("%", "%%")}
    derived |= _parsing(info.annotation, derived["default"])
    if flags and "choices" not in derived and "action" not in derived:  # the value's name: the flag's, not the field's
        derived["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()
    derived |= kwargs
    concept = concept or (name if not flags and name in FLAGS else None)
    if concept:
        action = option(p, concept, **derived)
    else:
        action = p.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), dest=name, **derived)
    if "default" not in kwargs:
        action.setting = (owner, name)  # type: ignore[attr-defined]
    return action


def _parsing(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse's ``type`` / ``choices`` / ``nargs`` / ``action`` for a field of type ``annotation``."""
    tp = _bare(annotation)
    if type(None) in typing.get_args(tp):  # X | None: the flag gives an X
        tp = _bare(next(a for a in typing.get_args(tp) if a is not type(None)))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (list, tuple):
        return {"nargs": len(args) if origin is tuple and Ellipsis not in args else "+", "type": _bare(args[0])}
    if tp is bool:
        return {"action": "store_false" if default else "store_true"}
    return {"type": tp}


def _bare(tp: Any) -> Any:
    """``int`` of ``Annotated[int, ...]``; any other type as it is."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def components_option(p: argparse.ArgumentParser, extra: str = "") -> argparse.Action:
    """``--components/-N``: the number N of mixture components (default: the default run's largest N)."""
    return option(p, "N", type=int, default=max(MODEL.N), metavar="N", help=f"mixture components N{extra}")


def data_options(p: argparse.ArgumentParser) -> None:
    """Dataset, its directory, a cap on the splits, the seed and the device (defaults: ``RunConfig``'s)."""
    for name in ("dataset", "data_dir", "limit"):
        setting(p, RUN, name)
    seed_device_options(p)


def seed_device_options(p: argparse.ArgumentParser, seeds: str = "split, initialization, noise") -> None:
    """``--seed`` (``seeds``: what it seeds) and ``--device``."""
    setting(p, RUN, "seed", help=f"random seed ({seeds})")
    setting(p, RUN, "device")


TRAIN_FLAGS = ("epochs", "patience", "lr", "batch_size", "amp", "compile")
"""The ``TrainConfig`` fields a training verb takes as flags."""


def train_options(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """A trainer's settings; ``defaults`` is the ``RunConfig`` section this verb's stage reads in ``vq2pc run``."""
    for name in TRAIN_FLAGS:
        setting(p, defaults, name)


def train_config(a: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The training settings of parsed :func:`train_options` (+ ``--seed``, ``--device``, ``extra``)."""
    return TrainConfig(**{name: getattr(a, name) for name in TRAIN_FLAGS}, seed=a.seed, device=a.device, **extra)


def beam_options(p: argparse.ArgumentParser) -> None:
    """DMBS options shared by the verbs that select latents (defaults: ``ModelSpec``'s)."""
    for name in ("starts", "beam_score", "beam_search"):
        setting(p, MODEL, name)
