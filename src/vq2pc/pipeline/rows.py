"""The result row: one entry of report.json's ``models`` list, typed.

Every stage that evaluates a model returns a :class:`ResultRow`; the run cache and report.json hold
its :meth:`~ResultRow.to_dict` (fields that are None are left out), and :meth:`~ResultRow.from_dict`
reads one back. A new field is one line here (name, type, default None); a key no field names is kept
in ``extra`` both ways, so rows with fields added elsewhere round-trip unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ResultRow"]


@dataclass
class ResultRow:
    """A model's test BPD and what the model is (see the module docstring)."""

    name: str  # "DMRS m", "DMRS m+FT σ<0.125", "CM (M=16384)", ...
    family: str  # the report's family: a method ("DMRS", "ExM", "CM", ...) and a variant ("+FT", "+EM", "+FT σ<c")
    N: int  # components (EiNet: input units)
    test_bpd: float  # mean over dequantization draws
    num_params: int | None = None
    test_bpd_std: float | None = None  # over draws
    val_bpd: float | None = None  # mean over the validation split (baselines: a family's best is chosen on it)
    test_bpd_median: float | None = None  # per-image quantiles
    test_bpd_p90: float | None = None
    test_bpd_p99: float | None = None
    test_bpd_max: float | None = None
    test_bpd_quantiles: list[float] | None = None  # the per-image curve at density.QUANTILE_LEVELS
    test_images: int | None = None
    leaf: str | None = None
    selection: str | None = None  # the selection strategy ("sample", "beam", ...; "einet" / "cm" for baselines)
    model: str | None = None  # the ModelSpec's name
    group: str | None = None
    K: int | None = None
    prior: str | None = None
    requested_N: int | None = None
    starts: int | None = None  # DMBS: start tokens per class
    beam_score: str | None = None
    beam_search: str | None = None
    std_floor: float | None = None
    shortfall_reason: str | None = None
    streamed: bool | None = None  # ExM evaluated by streaming, no circuit file
    source_params: int | None = None  # the VQ-VAE's (CM: the trained network's)
    circuit_file: str | None = None  # relative to the run folder
    selection_seconds: float | None = None
    train_seconds: float | None = None  # baselines (TrainResult.summary)
    train_epochs: int | None = None
    stopped_early: bool | None = None
    time_capped: bool | None = None
    time_cap_fired: bool | None = None
    finetune: dict[str, Any] | None = None  # +FT rows: the circuit's fine-tuning record
    ft_history: list[dict[str, float]] | None = None
    em_history: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys no field names (optional experiment fields)

    @property
    def method(self) -> str:
        """The family without its variant: "DMRS" of "DMRS+FT σ<0.125"."""
        return self.family.partition("+")[0]

    @property
    def variant(self) -> str:
        """What refines the method, "" for none: "+FT", "+FT σ<0.125", "+EM"."""
        _, plus, rest = self.family.partition("+")
        return plus + rest

    def to_dict(self) -> dict[str, Any]:
        """The JSON record: every field that is not None, in field order, then ``extra``."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS if getattr(self, f.name) is not None}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ResultRow:
        """The row of a :meth:`to_dict` record (keys no field names go to ``extra``)."""
        known = {f.name for f in _FIELDS}
        return cls(
            **{k: v for k, v in record.items() if k in known},
            extra={k: v for k, v in record.items() if k not in known and k != "extra"},
        )

    @classmethod
    def build(cls, **values: Any) -> ResultRow:
        """A row from keyword values: those no field names go to ``extra``."""
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> ResultRow:
        """A copy with ``changes`` (keys no field names go to ``extra``)."""
        return ResultRow.from_dict({**self.to_dict(), **changes})


_FIELDS = tuple(f for f in dataclasses.fields(ResultRow) if f.name != "extra")
