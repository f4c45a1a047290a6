"""Result rows: typed fields, a JSON round trip that keeps every key, method and variant of a family."""

from __future__ import annotations

import json

import pytest

from vq2pc.pipeline.rows import ResultRow


def _row() -> ResultRow:
    return ResultRow.build(
        name="DMRS m+FT σ<0.125",
        family="DMRS+FT σ<0.125",
        N=4096,
        test_bpd=3.1,
        test_bpd_std=0.0,
        test_bpd_quantiles=[2.0, 3.0],
        leaf="gaussian",
        selection="sample",
        requested_N=4096,
        finetune={"best_epoch": 3},
        ft_history=[{"epoch": 1, "lr": 1e-3}],
        discrete_bpd=3.05,
    )  # a key no field names yet


def test_json_round_trip_keeps_fields_and_extra_keys() -> None:
    row = _row()
    record = json.loads(json.dumps(row.to_dict()))
    assert ResultRow.from_dict(record) == row
    assert record["discrete_bpd"] == 3.05 and row.extra == {"discrete_bpd": 3.05} and "extra" not in record
    assert ResultRow.from_dict(record).to_dict() == record


def test_fields_that_are_none_are_left_out() -> None:
    record = _row().to_dict()
    assert "starts" not in record and "circuit_file" not in record and "num_params" not in record
    assert list(record)[:4] == ["name", "family", "N", "test_bpd"]  # field order, then extra keys
    assert list(record)[-1] == "discrete_bpd"


def test_method_and_variant_of_a_family() -> None:
    assert (_row().method, _row().variant) == ("DMRS", "+FT σ<0.125")
    plain = ResultRow("CM (M=64)", "CM", 64, 4.0)
    assert (plain.method, plain.variant) == ("CM", "")


def test_replace_changes_fields_and_keeps_the_rest() -> None:
    row = _row().replace(name="x", N=12, circuit_file="c.safetensors", em_history=[1.0], note="kept")
    assert (row.name, row.N, row.circuit_file, row.em_history) == ("x", 12, "c.safetensors", [1.0])
    assert row.extra == {"discrete_bpd": 3.05, "note": "kept"} and row.finetune == {"best_epoch": 3}


def test_a_record_without_a_required_field_is_an_error() -> None:
    with pytest.raises(TypeError, match="test_bpd"):
        ResultRow.from_dict({"name": "DMRS m", "family": "DMRS", "N": 4})
