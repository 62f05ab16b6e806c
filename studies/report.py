"""`vaegen report STUDY_DIR`: report.md, CSV tables and PNG plots, built purely from the run directories.

Reads <study_dir>/study.json (which study, its preset, where a budget stopped it, the DMs behind its shards) and,
for every <study_dir>/runs/<run>/, what it trained and measured (studies/results.py). Nothing is recomputed; a run
without eval/ is listed as unfinished. Every report has the results table, the ELBO curves and the gaps; the
other sections are the ones the study declares (studies/catalog.py), each shown when its runs hold what it needs.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from studies.plots import plot_elbo_curves, plot_gaps, plot_smoothness
from studies.presets import preset_from_record
from studies.results import RESULT_COLUMNS, Run, group_key, mean_sd, read_result
from studies.sections import SECTIONS, dm_identities, headline, results_table
from vaegen.errors import VaegenError
from vaegen.provenance import read_json, write_text_atomic


def write_tables(runs: list[Run], groups: dict[str, list[Run]], out: Path) -> None:
    """runs.csv (a row per run; G_r's two MS-SSIM terms for eval/ and each further evaluation, e.g. eval-kuzina/)
    and summary.csv (a row per group)."""
    extra = sorted({name for r in runs for name in r.more_gaps})
    robustness_columns = [f"{column}{'' if name == 'eval' else f'[{name}]'}" for name in ("eval", *extra)
                          for column in ("G_r", "msssim_clean", "msssim_attacked")]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "seed", "scale", "m_z", "n_c", "mix_real", "real_k", "sigma", "likelihood",
                    "sampler", "parameters", "parameters_z", "parameters_not_z", "finished", *RESULT_COLUMNS,
                    *robustness_columns[1:]])
        for r in runs:
            cells = []
            for gaps in (r.gaps, *(r.more_gaps.get(name, {}) for name in extra)):
                robust = gaps.get("robustness", {})
                cells += [robust.get("gap", ""), robust.get("msssim_input", {}).get("mean", ""),
                          robust.get("msssim_recon", {}).get("mean", "")]
            w.writerow([r.name, r.method, r.seed, r.scale, r.mz, r.nc, r.mix_real, r.real_k, r.sigma, r.likelihood,
                        r.sampler, r.parameters.get("total", ""), r.parameters.get("z", ""), r.parameters.get("not_z", ""),
                        r.finished, *(r.results.get(c, "") for c in RESULT_COLUMNS), *cells[1:]])
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n_seeds", *(f"{c}_{s}" for c in RESULT_COLUMNS for s in ("mean", "sd"))])
        for label, members in groups.items():
            stats = [mean_sd([m.results.get(c) for m in members]) for c in RESULT_COLUMNS]
            w.writerow([label, len(members), *(x for pair in stats for x in pair)])


def build_report(study_dir: str | Path) -> Path:
    from studies.catalog import STUDIES

    study_dir = Path(study_dir)
    runs_dir = study_dir / "runs"
    if not runs_dir.is_dir():
        raise VaegenError(f"{study_dir} is not a study directory (no runs/); run a `vaegen study` command first")
    study = read_json(study_dir / "study.json") if (study_dir / "study.json").exists() else {}
    runs = [r for r in (read_result(d) for d in sorted(runs_dir.iterdir()) if d.is_dir()) if r is not None]
    if not runs:
        raise VaegenError(f"{runs_dir} holds no VAE runs yet")
    finished = [r for r in runs if r.finished]
    with_sigma = len({r.sigma for r in finished}) > 1
    with_sampler = len({r.sampler for r in finished if r.source == "shards"}) > 1
    # several DMs of one training-set size (dm-quality's snapshots); dm-subsets' DMs are told apart by their size
    with_dm = len({(r.dm_n, r.dm) for r in finished if r.dm}) > len({r.dm_n for r in finished if r.dm})
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(finished, key=lambda r: (r.method != "Normal", r.real_k or 0, r.method, r.scale or 0,
                                             r.dm_n is None, r.dm_n or 0, r.dm_step is None, r.dm_step or 0,
                                             str(r.dm), r.mz or 0, r.nc or 0, r.sigma or 0)):
        groups[group_key(r, with_sigma, with_sampler, with_dm)].append(r)

    write_tables(runs, groups, study_dir)
    figures, sections = [], []
    if finished:
        plot_elbo_curves(groups, study_dir / "elbo_curves.png")
        plot_gaps(groups, study_dir / "gaps.png")
        figures += [("ELBO during training", "elbo_curves.png"), ("Gaps per method", "gaps.png")]
    kind = STUDIES.get(study.get("study"))
    for name in (s for s in (kind.sections if kind else SECTIONS) if s != "headline"):
        lines, section_figures = SECTIONS[name](finished, groups, study_dir)
        sections += lines
        figures += section_figures
    if any(r.gaps.get("smoothness") for r in finished) and (not kind or "smoothness" in kind.sections):
        plot_smoothness(groups, study_dir / "smoothness.png")

    title = f"{study['study'].capitalize()} study of {study['dataset']}" if study else f"Study {study_dir.name}"
    lines = [f"# {title}", ""]
    if kind and "headline" in kind.sections:
        lines += headline(groups, study)
    if study:
        preset = study.get("preset", {})
        executor = study.get("executor") or {"jobs": study.get("jobs", 1)}
        # epochs and seeds as the runs were set (overparam trains fewer epochs at fewer seeds than the preset's)
        epochs = sorted({r.epochs for r in runs if r.epochs}) or [preset.get("epochs")]
        seeds = sorted({r.seed for r in runs}) or preset.get("seeds")
        lines += [f"Preset `{preset.get('name')}`: |D_train| = {preset.get('subset') or 'full'}, "
                  f"{'/'.join(map(str, epochs))} effective epochs, seeds {seeds}, DM preset "
                  f"`{preset.get('dm_preset')}`, sampler {preset.get('sampler')} with {preset.get('sampler_steps')} "
                  f"steps. Wall time of the study's last invocation (a rerun skips finished work): "
                  f"{study.get('minutes')} min with {executor.get('jobs') or 1} job(s).", ""]
        cuts = preset.get("cuts", preset_from_record(preset).cuts)  # a record older than the field: its preset's
        if cuts:
            lines += [cuts, ""]
        lines += dm_identities(study)
        if study.get("stopped_at"):
            lines += [f"**The time budget stopped the study before run `{study['stopped_at']}`**; the runs below "
                      "are the ones that finished.", ""]
    unfinished = [r.name for r in runs if not r.finished]
    if unfinished:
        lines += [f"Unfinished (no eval/ yet): {', '.join(unfinished)}.", ""]
    lines += results_table(groups) + sections
    for caption, name in figures:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    write_text_atomic(study_dir / "report.md", "\n".join(lines))
    return study_dir / "report.md"
