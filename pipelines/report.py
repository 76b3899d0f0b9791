"""Comparison reports across evaluated runs: a Markdown table and side-by-side class grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from .evaluation import generate, load_pipeline, sample_call_kwargs

COLUMNS = ["run", "model", "loss", "emb", "epochs", "FID", "KID", "IS", "accuracy", "diversity", "flagged",
           "combined", "s/image"]


def newest_metrics(run: Path, name: Optional[str] = None) -> Path:
    if name:
        path = run / "eval" / name / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; evaluate the run first: python eval.py {run}")
        return path
    found = sorted((run / "eval").glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{run} has no eval/*/metrics.json; evaluate it first: python eval.py {run}")
    return found[-1]


def describe_run(run: Path) -> dict:
    """Model family, loss, embedding size and length, from the run's saved config."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    model = cfg.get("model", {})
    if "loss" in cfg:
        return {"model": f"cGAN ({model.get('arch')})", "loss": cfg["loss"].get("name"),
                "emb": model.get("label_emb_dim"), "epochs": cfg.get("train", {}).get("epochs")}
    if "diffusion" in cfg:
        return {"model": "DDPM (UNet2DModel)", "loss": cfg["diffusion"].get("prediction_type"), "emb": None,
                "epochs": cfg.get("train", {}).get("epochs")}
    return {"model": "?", "loss": None, "emb": None, "epochs": None}


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table_row(run: Path, metrics: dict) -> dict:
    info = describe_run(run)
    return {
        "run": run.name, **info,
        "FID": metrics.get("fid"), "KID": metrics.get("kid"),
        "IS": metrics.get("inception_score", metrics.get("classifier_score")),
        "accuracy": metrics.get("accuracy"), "diversity": metrics.get("diversity_ratio"),
        "flagged": len(metrics.get("flagged_classes", [])), "combined": metrics.get("combined_score"),
        "s/image": metrics.get("seconds_per_image"),
    }


def markdown_table(rows: list[dict], features: str) -> str:
    lines = [f"FID/KID/IS from {features} features; IS with classifier features is the classifier score; "
             "diversity = mean within-class feature distance vs real (flagged: classes below 0.8).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def side_by_side(runs: list[Path], path: Path, per_class: int, seed: int, metrics: list[dict]) -> Path:
    """One panel per run; the same classes per row and the same seeds in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(runs), figsize=(2.2 * len(runs) * per_class / 6 + 0.5, 4.5), squeeze=False)
    for ax, run, m in zip(axes[0], runs, metrics):
        pipe = load_pipeline(run)
        sampler = m.get("sampler", {})
        kwargs = sample_call_kwargs(pipe, sampler.get("num_inference_steps"), sampler.get("guidance_scale"))
        num_classes = len(pipe.config.class_names) if pipe.config.class_names else 10
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        images = generate(pipe, labels, batch_size=len(labels), seed=seed, **kwargs)
        grid = make_grid(images.float() / 255, nrow=per_class, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray" if grid.shape[0] == 1 else None)
        ax.set_title(run.name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def compare_runs(runs: list[Path], out: Path, metrics_name: Optional[str] = None, per_class: int = 6,
                 seed: int = 0) -> str:
    """Write report.md, report.json and grids.png for `runs` to `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = [json.loads(newest_metrics(run, metrics_name).read_text()) for run in runs]
    rows = [table_row(run, m) for run, m in zip(runs, metrics)]
    features = ", ".join(sorted({m.get("features", "?") for m in metrics}))
    text = "# Comparison\n\n" + markdown_table(rows, features)
    side_by_side(runs, out / "grids.png", per_class, seed, metrics)
    text += "\n![side by side](grids.png)\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    return text
