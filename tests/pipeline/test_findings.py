"""The report's notes: comparisons computed from result rows, with the right signs and pairings."""

from __future__ import annotations

from vq2pc.pipeline.findings import findings


def _row(family: str, N: int, bpd: float, **extra) -> dict:
    return {
        "leaf": "gaussian",
        "model": "4x4",
        "family": family,
        "name": f"{family} 4x4",
        "N": N,
        "requested_N": N,
        "test_bpd": bpd,
        **extra,
    }


def test_beam_searches_are_compared_with_dmrs_at_equal_n_only() -> None:
    rows = [
        _row("DMRS", 256, 3.5),
        _row("DMRS", 1024, 3.2),
        _row("DMRS+FT", 1024, 3.0),
        _row("DMBS", 1024, 3.7),
        _row("DMBS+FT", 1024, 3.4),
        _row("DMGS+FT", 1024, 2.95),
        _row("DMBS", 4096, 3.1),
    ]  # no DMRS at 4096: no note
    notes = findings({"models": rows})
    assert "[gaussian] DMBS vs DMRS (4x4, N=1024): 3.7000 vs 3.2000 BPD (DMBS +0.5000)." in notes
    assert "[gaussian] DMBS+FT vs DMRS+FT (4x4, N=1024): 3.4000 vs 3.0000 BPD (DMBS +0.4000)." in notes
    assert "[gaussian] DMGS+FT vs DMRS+FT (4x4, N=1024): 2.9500 vs 3.0000 BPD (DMGS -0.0500)." in notes
    assert not any("N=4096" in n or "N=256" in n for n in notes)


def test_baselines_are_compared_with_the_best_distilled_and_fine_tuned_circuits() -> None:
    rows = [_row("DMRS", 4096, 4.6), _row("DMRS+FT", 4096, 2.87), _row("EiNet", 10, 2.94), _row("CM", 16384, 3.1)]
    text = "\n".join(findings({"models": rows}))
    assert "EiNet" in text and "2.9400 BPD is worse than the best fine-tuned" in text
    assert "2.9400 BPD is better than the best distilled model DMRS 4x4 (N=4096) 4.6000" in text


def test_a_baseline_sweep_is_represented_by_its_best_on_validation_not_on_test() -> None:
    rows = [
        _row("DMRS+FT", 4096, 2.87),
        {**_row("EiNet", 10, 2.94, val_bpd=2.99), "name": "EiNet (PD 4, I=10)"},
        {**_row("EiNet", 40, 2.90, val_bpd=3.01), "name": "EiNet (PD 4, I=40)"},  # lower on test, not on validation
    ]
    text = "\n".join(findings({"models": rows}))
    assert "best EiNet (best of 2 on validation) EiNet (PD 4, I=10) 2.9400 BPD is worse" in text
    assert "I=40" not in text


def test_each_fine_tuned_row_is_compared_with_the_row_it_refines() -> None:
    """A +FT row, capped ("+FT σ<c") or not, is set against its paper-faithful twin at the same N."""
    rows = [
        _row("DMRS", 4096, 7.6),
        _row("DMRS", 1024, 20.6),
        {**_row("DMRS+FT σ<0.125", 4096, 4.07), "name": "DMRS 4x4+FT σ<0.125"},
        {**_row("DMRS+FT", 1024, 3.03), "name": "DMRS 4x4+FT"},
    ]
    notes = findings({"models": rows})
    assert (
        "[gaussian] fine-tuned distillation σ<0.125 (beyond the paper) of DMRS 4x4 N=4096: 7.6000 -> 4.0700 test BPD."
    ) in notes
    assert (
        "[gaussian] fine-tuned distillation (beyond the paper) of DMRS 4x4 N=1024: 20.6000 -> 3.0300 test BPD."
    ) in notes


def test_capped_fine_tuned_rows_are_compared_with_capped_ones() -> None:
    rows = [
        {**_row("DMRS+FT", 4096, 2.9), "name": "DMRS 4x4+FT"},
        {**_row("DMRS+FT σ<0.1", 4096, 4.0), "name": "DMRS 4x4+FT σ<0.1"},
        {**_row("DMBS+FT σ<0.1", 4096, 4.25), "name": "DMBS 4x4+FT σ<0.1"},
    ]
    notes = findings({"models": rows})
    assert "[gaussian] DMBS+FT σ<0.1 vs DMRS+FT σ<0.1 (4x4, N=4096): 4.2500 vs 4.0000 BPD (DMBS +0.2500)." in notes
    assert not any("DMBS+FT vs" in n for n in notes)
