"""Orchestration, on top of the three stages: the `vaegen` command group, the studies (each a short declaration
of its runs in studies/catalog.py, run by one skeleton in studies/study.py), their presets, the job executors
(local processes, Slurm) and the study report. Nothing below imports from here."""
