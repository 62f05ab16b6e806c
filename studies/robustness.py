"""The robustness study's report section: G_r by protocol for every group, and Table 7's four methods ordered by
G_r under each training factor (studies/sections.py shows it where a study declares it)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from studies.results import Run, Section, fmt, mean_sd

# Table 7 (FashionMNIST): G_r of Aug.Naive 0.11 < Aug.Tuned 0.21 < DMaaPx 0.31 < Normal 0.39.
PAPER_G_R_ORDER = ("Aug.Naive", "Aug.Tuned", "DMaaPx", "Normal")


def g_r_by_protocol(run: Run, steps: bool = False) -> dict[str, dict]:
    """{protocol: the robustness entry of its gaps.json} over every evaluation of the run (eval/, eval-kuzina/),
    vaegen's first; with `steps`, the Kuzina protocol's rescorings as protocols of their own ("kuzina: attack")."""
    out = {}
    for gaps in (run.gaps, *run.more_gaps.values()):
        robust = gaps.get("robustness", {})
        if "msssim_input" in robust:
            protocol = robust.get("protocol", "vaegen")
            out[protocol] = robust
            if steps:
                out.update({f"{protocol}: {name}": variant for name, variant in robust.get("variants", {}).items()})
    return dict(sorted(out.items(), key=lambda item: (item[0] != "vaegen", ":" not in item[0], item[0])))


PROTOCOL_STEPS = ("Protocols: vaegen's; Kuzina et al.'s (kuzina); and between them, Kuzina et al.'s attacked inputs "
                  "(their images, start, loop and kept iterate) scored with vaegen's MS-SSIM and posterior-mean x~ "
                  "(kuzina: attack), with their MS-SSIM (kuzina: attack+msssim) or with their sampled x~ "
                  "(kuzina: attack+reconstruction).")


def robustness_section(groups: dict[str, list[Run]]) -> Section:
    """G_r under each protocol the runs were evaluated with, its 95% interval (over attack seeds), its two MS-SSIM
    terms, and the other gaps beside it; then the compare methods' G_r order under each training factor."""
    rows = []
    for label, members in groups.items():
        by_protocol = defaultdict(list)
        for m in members:
            for protocol, robust in g_r_by_protocol(m).items():
                by_protocol[protocol].append(robust)
        for protocol, robust in by_protocol.items():
            ci = [r["ci95"] for r in robust if r.get("ci95")]
            interval = f"[{np.mean([c[0] for c in ci]):.3f}, {np.mean([c[1] for c in ci]):.3f}]" if ci else "–"
            cells = [fmt(*mean_sd([r["gap"] for r in robust]), 3), interval,
                     fmt(*mean_sd([r["msssim_input"]["mean"] for r in robust]), 3),
                     fmt(*mean_sd([r["msssim_recon"]["mean"] for r in robust]), 3),
                     *(fmt(*mean_sd([m.results.get(k) for m in members]), 1) for k in ("G_g", "G_a", "test_elbo"))]
            rows.append(f"| {label} | {protocol} | {len(robust)} | " + " | ".join(cells) + " |")
    if not rows:
        return [], []
    return ["## Robustness gap by training factor and protocol", "",
            "G_r = MS-SSIM(x, x_a) - MS-SSIM(x~, x~_a) (clean-vs-attacked similarity of the inputs and of their "
            "reconstructions; mean over runs). Its 95% interval is over attack seeds, averaged over the group's "
            "runs. G_g, G_a and the test ELBO (from the vaegen evaluation) show whether a factor moves them too.",
            "",
            "| group | protocol | runs | G_r | G_r 95% interval | MS-SSIM(x, x_a) | MS-SSIM(x~, x~_a) | G_g | G_a | "
            "test ELBO |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            *g_r_orderings([m for members in groups.values() for m in members])], []


def training_choices(run: Run) -> dict:
    """The training choices the robustness study varies, where they apply to the run's method."""
    out = {"likelihood": run.likelihood or "gaussian"}
    if out["likelihood"] == "gaussian":
        out["sigma"] = run.sigma
    if run.augment:
        out["augment_output"] = run.augment_output or "uint8"
    if run.source == "shards":
        out["sampler"] = run.sampler
    return out


def g_r_orderings(runs: list[Run]) -> list[str]:
    """Per training factor and protocol, Table 7's four methods ordered by mean G_r, and how many of their six
    pairs are in Table 7's order. A factor is a departure from the study's baseline (each choice's most common
    value over the runs); a method the factor does not change keeps its baseline G_r (marked *)."""
    runs = [r for r in runs if r.base in PAPER_G_R_ORDER and r.mz is None and not r.real_k and not r.dm_n
            and set(r.modifiers) <= {"float augmentation", "calibrated decoder"}]
    counts = defaultdict(Counter)
    for run in runs:
        for key, value in training_choices(run).items():
            counts[key][value] += 1
    baseline = {key: count.most_common(1)[0][0] for key, count in counts.items()}
    names = {"likelihood": lambda v: "calibrated decoder" if v == "gaussian-calibrated" else f"likelihood {v}",
             "sigma": lambda v: f"sigma={v:g}", "augment_output": lambda v: f"Aug.* output {v}",
             "sampler": lambda v: f"DMaaPx shards by {v}"}
    g_r = defaultdict(lambda: defaultdict(list))  # {(factor, protocol): {method: [G_r of each run]}}
    for run in runs:
        factor = ", ".join(names[k](v) for k, v in training_choices(run).items() if v != baseline[k]) or "baseline"
        for protocol, robust in g_r_by_protocol(run, steps=factor == "baseline").items():
            g_r[factor, protocol][run.base].append(robust["gap"])
    rows = []
    # baseline first, then the factors by name; each factor's protocols in g_r_by_protocol's order
    for (factor, protocol), methods in sorted(g_r.items(), key=lambda item: (item[0][0] != "baseline", item[0][0])):
        base = g_r.get(("baseline", protocol), {})
        means = {m: (float(np.mean(v)), "") for m, v in base.items()}
        if factor != "baseline":
            means = {m: (g, "*") for m, (g, _) in means.items()}
        means.update({m: (float(np.mean(v)), "") for m, v in methods.items()})
        if len(means) < len(PAPER_G_R_ORDER):
            continue
        order = sorted(means, key=lambda m: means[m][0])
        agree = sum(order.index(a) < order.index(b) for i, a in enumerate(PAPER_G_R_ORDER)
                    for b in PAPER_G_R_ORDER[i + 1:])
        rows.append(f"| {factor} | {protocol} | " + " < ".join(f"{m} {means[m][0]:.3f}{means[m][1]}" for m in order)
                    + f" | {agree}/6 |")
    if not rows:
        return []
    settings = ", ".join(f"{k} {v}" for k, v in baseline.items())
    return ["### G_r order of Table 7's methods, per factor", "",
            f"Table 7 (FashionMNIST): {' < '.join(PAPER_G_R_ORDER)} (0.11, 0.21, 0.31, 0.39). Baseline: {settings}. "
            "A factor changes one choice; * marks a method it does not change (its baseline G_r). The last column "
            "counts the method pairs in Table 7's order (6/6: the same order).",
            *(["", PROTOCOL_STEPS] if any(":" in protocol for _, protocol in g_r) else []), "",
            "| factor | protocol | G_r, lowest first | pairs as in Table 7 |", "|---|---|---|---|", *rows, ""]
