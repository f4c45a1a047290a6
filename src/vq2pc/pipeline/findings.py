"""Plain sentences, computed from a run's numbers, that check the paper's claims and flag caveats.

They go to the report's "Honest notes": whether the exact model bounds the distilled ones,
whether beam search matches random sampling at equal N, how the baselines compare, how the
priors compare when models differ only in their prior, and
where a number was measured on fewer test images or components than asked for.
"""

from __future__ import annotations

from typing import Any

from vq2pc.pipeline.rows import ResultRow

__all__ = ["findings"]

_DISTILLED = ("DMRS", "DMGS", "DMBS", "TopK", "DMData")  # the paper's claims are about these (not +EM)


def _by(rows: list[ResultRow], family: str) -> list[ResultRow]:
    return [r for r in rows if r.family == family]


def _exm_bound(rows: list[ResultRow], leaf: str) -> list[str]:
    notes = []
    for exm in _by(rows, "ExM"):
        same = [r for r in rows if r.model == exm.model and r.family in _DISTILLED]
        if not same:
            continue
        best = min(same, key=lambda r: r.test_bpd)
        verdict = (
            "the exact model is the bound, as the paper says"
            if exm.test_bpd <= best.test_bpd
            else (
                "a distilled circuit beats the exact model (the paper expects ExM to be the bound; "
                "a subset re-weighted by prior/uniform weights can fit the test data better)"
            )
        )
        notes.append(
            f"[{leaf}] {exm.name}: {exm.test_bpd:.4f} BPD vs best distilled {best.name} "
            f"(N={best.N}) {best.test_bpd:.4f}: {verdict}."
        )
    return notes


def _beam_vs_sample(rows: list[ResultRow], leaf: str) -> list[str]:
    """DMBS (and the stochastic beam search DMGS) against DMRS at the same requested N, paper-faithful and
    fine-tuned (the paper: DMBS follows DMRS)."""
    notes = []
    suffixes = sorted({r.variant for r in rows if r.method in ("DMBS", "DMGS")})  # "", "+FT", "+FT σ<c"
    beams = [beam for method in ("DMBS", "DMGS") for suffix in suffixes for beam in _by(rows, method + suffix)]
    for beam in beams:
        target = beam.requested_N or beam.N
        match = [
            r
            for r in rows
            if r.method == "DMRS" and r.variant == beam.variant and r.model == beam.model and r.requested_N == target
        ]
        if match:
            diff, suffix = beam.test_bpd - match[0].test_bpd, beam.variant
            notes.append(
                f"[{leaf}] {beam.family} vs DMRS{suffix} ({beam.model}, N={target}): "
                f"{beam.test_bpd:.4f} vs {match[0].test_bpd:.4f} BPD "
                f"({beam.method} {'+' if diff >= 0 else ''}{diff:.4f})."
            )
    return notes


def _baselines(rows: list[ResultRow], leaf: str) -> list[str]:
    """The best of each baseline family (CM, EiNet, QuadGraph, QuadTree, HCLT, PIC) against the best paper-faithful and the best fine-tuned distilled circuit."""
    kinds = {
        "distilled model": [r for r in rows if r.family in (*_DISTILLED, "ExM")],
        "fine-tuned distilled model": [r for r in rows if r.variant.startswith("+FT")],
    }
    notes = []
    for kind, distilled in kinds.items():
        if not distilled:
            continue
        best = min(distilled, key=lambda r: r.test_bpd)
        for family in ("CM", "EiNet", "QuadGraph", "QuadTree", "HCLT", "PIC"):
            fam = _by(rows, family)
            if fam:
                on_val = all(r.val_bpd is not None for r in fam)  # a sweep's best is chosen on validation
                top = min(fam, key=lambda r: r.val_bpd if on_val else r.test_bpd)
                rel = "better" if top.test_bpd < best.test_bpd else "worse"
                chosen = f" (best of {len(fam)} on validation)" if on_val and len(fam) > 1 else ""
                notes.append(
                    f"[{leaf}] best {family}{chosen} {top.name} {top.test_bpd:.4f} BPD is {rel} than the best "
                    f"{kind} {best.name} (N={best.N}) {best.test_bpd:.4f}."
                )
    return notes


_REFINEMENTS = {"+EM": "EM refinement", "+FT": "fine-tuned distillation"}


def _refined(rows: list[ResultRow], leaf: str) -> list[str]:
    """Each +EM / +FT row against the paper-faithful row it refines (mean and median per-image BPD)."""
    notes = []
    for tag, what in _REFINEMENTS.items():
        for new in (r for r in rows if r.variant.startswith(tag)):
            name, _, variant = new.name.rpartition(tag)  # "DMRS 4x4", "+FT", "" or " σ<0.125"
            base = [r for r in rows if r.name == name and r.N == new.N]
            if base:
                old = base[0]
                median = (
                    f" (median per image {old.test_bpd_median:.3f} -> {new.test_bpd_median:.3f})"
                    if old.test_bpd_median is not None and new.test_bpd_median is not None
                    else ""
                )
                notes.append(
                    f"[{leaf}] {what}{variant} (beyond the paper) of {old.name} N={new.N}: "
                    f"{old.test_bpd:.4f} -> {new.test_bpd:.4f} test BPD{median}."
                )
    return notes


def _priors(rows: list[ResultRow], report: dict[str, Any], leaf: str) -> list[str]:
    """When a leaf's models use different priors: each one's val NLL, DMRS/DMBS BPD at its largest N, selection time."""
    sources = [s for s in report.get("sources", []) if s.get("leaf") == leaf and s.get("prior")]
    if len({s["prior"] for s in sources}) < 2:
        return []
    parts = []
    for s in sources:
        picked = [r for r in rows if r.model == s["model"] and r.family in ("DMRS", "DMBS")]
        asked = {id(r): r.requested_N or r.N for r in picked}  # DMBS rounds N down to s·C·B
        n = max(asked.values(), default=None)
        bpd = ", ".join(f"{r.family} {r.test_bpd:.4f}" for r in picked if asked[id(r)] == n)
        times = [r.selection_seconds for r in picked if r.selection_seconds is not None]
        seconds = f", {sum(times) / len(times):.2f} s per DMRS/DMBS selection" if times else ""
        parts.append(
            f"{s['model']} ({s['prior']}, {s.get('prior_params')} params): val NLL "
            f"{s.get('prior_val_nll_per_latent', float('nan')):.4f} nats/latent"
            + (f", N={n}: {bpd} BPD" if picked else "")
            + seconds
        )
    return [f"[{leaf}] priors compared: " + "; ".join(parts) + "."]


def _caveats(rows: list[ResultRow], report: dict[str, Any]) -> list[str]:
    notes = []
    full = report.get("splits", {}).get("test")
    for r in rows:
        if full and r.test_images and r.test_images < full:
            notes.append(f"{r.leaf}: {r.name} was evaluated on {r.test_images} of {full} test images.")
        if r.requested_N and r.N < r.requested_N:
            why = (
                f"the beam width B = N // (s·C) with s = {r.starts} rounds down, and a start token's "
                "subtree can hold fewer than the latents asked of it"
                if r.method == "DMBS"
                else "fewer distinct latents were found"
            )
            notes.append(f"{r.leaf}: {r.name} has N={r.N} for the requested {r.requested_N}: {why}.")
    return notes


def findings(report: dict[str, Any]) -> list[str]:
    """Sentences for the report's notes, from ``report["models"]`` (the records of every leaf's rows)."""
    every = [ResultRow.from_dict(r) for r in report.get("models", [])]
    notes: list[str] = []
    for leaf in dict.fromkeys(r.leaf for r in every):
        rows = [r for r in every if r.leaf == leaf and r.test_bpd is not None]
        notes += _exm_bound(rows, leaf) + _beam_vs_sample(rows, leaf) + _baselines(rows, leaf) + _refined(rows, leaf)
        notes += _priors(rows, report, leaf)
    return notes + _caveats(every, report)
