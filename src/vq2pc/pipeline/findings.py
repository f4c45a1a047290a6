"""Plain sentences, computed from a run's numbers, that check the paper's claims and flag caveats.

They go to the report's "Honest notes": whether the exact model bounds the distilled ones,
whether beam search matches random sampling at equal N, how the baselines compare, how the
priors compare when models differ only in their prior, and
where a number was measured on fewer test images or components than asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["findings"]

_DISTILLED = ("DMRS", "DMGS", "DMBS", "TopK", "DMData")  # the paper's claims are about these (not +EM)


def _by(rows: list[dict], family: str) -> list[dict]:
    return [r for r in rows if r.get("family") == family]


def _exm_bound(rows: list[dict], leaf: str) -> list[str]:
    notes = []
    for exm in _by(rows, "ExM"):
        same = [r for r in rows if r.get("model") == exm.get("model") and r.get("family") in _DISTILLED]
        if not same:
            continue
        best = min(same, key=lambda r: r["test_bpd"])
        verdict = "the exact model is the bound, as the paper says" if exm["test_bpd"] <= best["test_bpd"] else (
            "a distilled circuit beats the exact model (the paper expects ExM to be the bound; "
            "a subset re-weighted by prior/uniform weights can fit the test data better)")
        notes.append(f"[{leaf}] {exm['name']}: {exm['test_bpd']:.4f} BPD vs best distilled {best['name']} "
                     f"(N={best['N']}) {best['test_bpd']:.4f}: {verdict}.")
    return notes


def _beam_vs_sample(rows: list[dict], leaf: str) -> list[str]:
    """DMBS (and the stochastic beam search DMGS) against DMRS at the same requested N, paper-faithful and
    fine-tuned (the paper: DMBS follows DMRS)."""
    notes = []
    suffixes = sorted({str(r["family"])[4:] for r in rows if str(r.get("family", ""))[:4] in ("DMBS", "DMGS")})
    for family in ("DMBS", "DMGS"):
        for suffix in suffixes:  # "", "+FT", "+FT σ<c"
            for beam in _by(rows, family + suffix):
                target = beam.get("requested_N") or beam["N"]
                match = [r for r in _by(rows, "DMRS" + suffix)
                         if r.get("model") == beam.get("model") and r.get("requested_N") == target]
                if match:
                    diff = beam["test_bpd"] - match[0]["test_bpd"]
                    notes.append(f"[{leaf}] {family}{suffix} vs DMRS{suffix} ({beam.get('model')}, N={target}): "
                                 f"{beam['test_bpd']:.4f} vs {match[0]['test_bpd']:.4f} BPD "
                                 f"({family} {'+' if diff >= 0 else ''}{diff:.4f}).")
    return notes


def _baselines(rows: list[dict], leaf: str) -> list[str]:
    """The best of each baseline family (CM, EiNet, QuadGraph, QuadTree, HCLT) against the best paper-faithful and the best fine-tuned distilled circuit."""
    kinds = {"distilled model": [r for r in rows if r.get("family") in _DISTILLED + ("ExM",)],
             "fine-tuned distilled model": [r for r in rows if "+FT" in str(r.get("family", ""))]}
    notes = []
    for kind, distilled in kinds.items():
        if not distilled:
            continue
        best = min(distilled, key=lambda r: r["test_bpd"])
        for family in ("CM", "EiNet", "QuadGraph", "QuadTree", "HCLT"):
            fam = _by(rows, family)
            if fam:
                top = min(fam, key=lambda r: r["test_bpd"])
                rel = "better" if top["test_bpd"] < best["test_bpd"] else "worse"
                notes.append(f"[{leaf}] best {family} {top['name']} {top['test_bpd']:.4f} BPD is {rel} than the best "
                             f"{kind} {best['name']} (N={best['N']}) {best['test_bpd']:.4f}.")
    return notes


_REFINEMENTS = {"+EM": "EM refinement", "+FT": "fine-tuned distillation"}


def _refined(rows: list[dict], leaf: str) -> list[str]:
    """Each +EM / +FT row against the paper-faithful row it refines (mean and median per-image BPD)."""
    notes = []
    for tag, what in _REFINEMENTS.items():
        for new in (r for r in rows if tag in str(r.get("family", ""))):
            name, _, variant = new["name"].rpartition(tag)  # "DMRS 4x4", "+FT", "" or " σ<0.125"
            base = [r for r in rows if r.get("name") == name and r.get("N") == new["N"]]
            if base:
                median = (f" (median per image {base[0]['test_bpd_median']:.3f} -> {new['test_bpd_median']:.3f})"
                          if "test_bpd_median" in base[0] and "test_bpd_median" in new else "")
                notes.append(f"[{leaf}] {what}{variant} (beyond the paper) of {base[0]['name']} N={new['N']}: "
                             f"{base[0]['test_bpd']:.4f} -> {new['test_bpd']:.4f} test BPD{median}.")
    return notes


def _priors(rows: list[dict], report: dict[str, Any], leaf: str) -> list[str]:
    """When a leaf's models use different priors: each one's val NLL, DMRS/DMBS BPD at its largest N, selection time."""
    sources = [s for s in report.get("sources", []) if s.get("leaf") == leaf and s.get("prior")]
    if len({s["prior"] for s in sources}) < 2:
        return []
    parts = []
    for s in sources:
        picked = [r for r in rows if r.get("model") == s["model"] and r.get("family") in ("DMRS", "DMBS")]
        asked = {id(r): r.get("requested_N") or r["N"] for r in picked}  # DMBS rounds N down to s·C·B
        n = max(asked.values(), default=None)
        bpd = ", ".join(f"{r['family']} {r['test_bpd']:.4f}" for r in picked if asked[id(r)] == n)
        times = [r["selection_seconds"] for r in picked if r.get("selection_seconds") is not None]
        seconds = f", {sum(times) / len(times):.2f} s per DMRS/DMBS selection" if times else ""
        parts.append(f"{s['model']} ({s['prior']}, {s.get('prior_params')} params): val NLL "
                     f"{s.get('prior_val_nll_per_latent', float('nan')):.4f} nats/latent"
                     + (f", N={n}: {bpd} BPD" if picked else "") + seconds)
    return [f"[{leaf}] priors compared: " + "; ".join(parts) + "."]


def _caveats(rows: list[dict], report: dict[str, Any]) -> list[str]:
    notes = []
    full = report.get("splits", {}).get("test")
    for r in rows:
        if full and r.get("test_images") and r["test_images"] < full:
            notes.append(f"{r['leaf']}: {r['name']} was evaluated on {r['test_images']} of {full} test images.")
        if r.get("requested_N") and r["N"] < r["requested_N"]:
            why = (f"the beam width B = N // (s·C) with s = {r.get('starts')} rounds down, and a start token's "
                   "subtree can hold fewer than the latents asked of it" if str(r.get("family")).startswith("DMBS")
                   else "fewer distinct latents were found")
            notes.append(f"{r['leaf']}: {r['name']} has N={r['N']} for the requested {r['requested_N']}: {why}.")
    return notes


def findings(report: dict[str, Any]) -> list[str]:
    """Sentences for the report's notes, from ``report["models"]`` (rows of every leaf)."""
    notes: list[str] = []
    for leaf in dict.fromkeys(r.get("leaf") for r in report.get("models", [])):
        rows = [r for r in report["models"] if r.get("leaf") == leaf and r.get("test_bpd") is not None]
        notes += _exm_bound(rows, leaf) + _beam_vs_sample(rows, leaf) + _baselines(rows, leaf) + _refined(rows, leaf)
        notes += _priors(rows, report, leaf)
    return notes + _caveats(report.get("models", []), report)
