"""The VAE run directory contract between the trainer (writes), the evaluator and the studies (read).

    runs/vae/<name>/config.json        the resolved training config (dataset, subset, source, model, ...)
    runs/vae/<name>/metrics.jsonl      real train/test ELBO every --eval-every epochs
    runs/vae/<name>/model.json, model.safetensors   the VAE (trainer.models.save_vae / load_vae)
    runs/vae/<name>/snapshots/epoch-NNNNNN.safetensors   --track-gaps: the model at the tracking epochs
    runs/vae/<name>/done.json          written last: the run finished
    runs/vae/<name>/eval/gaps.json     the evaluator's summary (eval/per_example.zarr beside it)
    runs/vae/<name>/eval/gap_curves.jsonl   --track-gaps: G_a and G_r of every snapshot (one line each)
"""

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
DONE_NAME = "done.json"
EVAL_DIR = "eval"
GAPS_NAME = "gaps.json"
SNAPSHOTS = "snapshots"
GAP_CURVES_NAME = "gap_curves.jsonl"
