"""Comparison reports across evaluated runs: a Markdown table and side-by-side class grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .evaluation import generate, sample_call_kwargs
from .exports import load_pipeline
from .families import for_run
from .metrics import combined_score
from .rundir import run_config
from .tracking import log_comparison, read_stats

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
    """Model family, loss, embedding size and length, from the run's saved config (as its family reads it)."""
    cfg = run_config(run) or {}
    family = for_run(run)
    if family is None:
        return {"model": "?", "loss": None, "emb": None, "epochs": None}
    return {"model": None, "loss": None, "emb": None, **family.report(cfg), "epochs": cfg.get("train", {}).get("epochs")}


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
        kwargs = sample_call_kwargs(pipe, sampler.get("num_inference_steps"), sampler.get("guidance_scale"),
                                    sampler.get("guidance_interval"))
        num_classes = len(pipe.class_names) or 10
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
                 seed: int = 0, wandb: str = "disabled") -> str:
    """Write report.md, report.json and grids.png for `runs` to `out` (and log them to W&B unless `wandb` is
    disabled); return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = [json.loads(newest_metrics(run, metrics_name).read_text()) for run in runs]
    rows = [table_row(run, m) for run, m in zip(runs, metrics)]
    features = ", ".join(sorted({m.get("features", "?") for m in metrics}))
    text = "# Comparison\n\n" + markdown_table(rows, features)
    side_by_side(runs, out / "grids.png", per_class, seed, metrics)
    text += "\n![side by side](grids.png)\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    if wandb != "disabled":
        log_comparison(runs, rows, out / "grids.png", wandb, out)
    return text


# ---------------------------------------------------------------- studies (python -m pipelines.sweep)

STUDY_METRICS = ["FID", "IS", "LPIPS", "combined", "offline FID", "KID", "accuracy", "class. score", "diversity",
                 "flagged", "combined (offline)", "s/image"]


def _export_epoch(run, name: str) -> Optional[int]:
    if name.startswith("epoch_"):
        return int(name.split("_")[1])
    if name == "best":
        best = run.output_dir / "best" / "best.json"
        return json.loads(best.read_text())["epoch"] if best.is_file() else None
    return run.cfg.train.epochs


def study_rows(study) -> list[dict]:
    """One row per evaluated export: the seeds' columns (Inception FID, IS, LPIPS, combined score)
    where available, then the offline ones (classifier-feature FID, KID, accuracy, diversity)."""
    rows = []
    for run in study.runs:
        for name in run.targets(study.kind):
            folder = run.output_dir / "eval" / f"study-{name}"
            if not (folder / "metrics.json").is_file():
                continue
            m = json.loads((folder / "metrics.json").read_text())
            inc_file = run.output_dir / "eval" / f"study-{name}-inception" / "metrics.json"
            inc = json.loads(inc_file.read_text()) if inc_file.is_file() else {}
            row = {"run": run.name, **({k: v for k, v in run.swept.items() if k != "run"}),
                   "model": describe_run(run.output_dir)["model"], "export": name, "epochs": _export_epoch(run, name),
                   "FID": inc.get("fid"), "IS": inc.get("inception_score"), "LPIPS": m.get("lpips"),
                   "combined": inc.get("combined_score"), "offline FID": m["fid"], "KID": m["kid"],
                   "accuracy": m.get("accuracy"), "class. score": m.get("classifier_score"),
                   "diversity": m.get("diversity_ratio"), "flagged": len(m.get("flagged_classes", [])),
                   "combined (offline)": combined_score(m["fid"], m.get("classifier_score"), m.get("lpips")),
                   "s/image": m.get("seconds_per_image"), "grid": str(folder / "grid.png")}
            rows.append(row)
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None


def factor_summary(rows: list[dict], factor: str, rank_key: str) -> list[dict]:
    """Means over every other factor for each value of `factor` (a paired design: the grid is full)."""
    summary = []
    for value in sorted({r[factor] for r in rows}, key=str):
        group = [r for r in rows if r[factor] == value]
        summary.append({factor: value, "exports": len(group), f"mean {rank_key}": _mean([r[rank_key] for r in group]),
                        "mean offline FID": _mean([r["offline FID"] for r in group]),
                        "mean accuracy": _mean([r["accuracy"] for r in group]),
                        "mean diversity": _mean([r["diversity"] for r in group]),
                        "collapsed exports (>= 5 flagged classes)": sum(r["flagged"] >= 5 for r in group)})
    return summary


def plot_eval_curves(study, path: Path, best: Optional[dict] = None) -> Optional[Path]:
    """The in-training evaluation of every run (offline FID and accuracy per epoch) in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for run in study.runs:
        records = [r for r in read_stats(run.output_dir) if "eval/fid" in r]
        for ax, key in zip(axes, ("eval/fid", "eval/accuracy")):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                line, = ax.plot(*zip(*points), marker="o", ms=3, label=run.name)
                drawn = True
                if best and run.name in best and key == "eval/fid":
                    epoch = best[run.name]
                    ax.plot([epoch], [dict(points).get(epoch)], "*", ms=14, color=line.get_color())
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axes[0].set(xlabel="epoch", ylabel="offline FID (lower is better)", yscale="log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_formatter(plain)
    axes[1].set(xlabel="epoch", ylabel="conditional accuracy")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grid_matrix(rows: list[dict], path: Path) -> Path:
    """The evaluation grids (one row per class, same seeds) of every export: a row per run, a column per export."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({r["run"] for r in rows})
    exports = sorted({r["export"] for r in rows})  # epoch_001 < epoch_002 ...; best < final
    fig, axes = plt.subplots(len(runs), len(exports), figsize=(2.4 * len(exports), 2.6 * len(runs)), squeeze=False)
    for i, run in enumerate(runs):
        for j, export in enumerate(exports):
            ax = axes[i][j]
            ax.axis("off")
            row = next((r for r in rows if r["run"] == run and r["export"] == export), None)
            if row and Path(row["grid"]).is_file():
                ax.imshow(plt.imread(row["grid"]), cmap="gray")
                ax.set_title(f"{run} {export}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_study_report(study, inception_note: Optional[str] = None) -> str:
    """report.md, report.json, curves.png and grids.png of a study, in `study.report_dir`."""
    out = study.report_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = study_rows(study)
    missing = [r.name for r in study.runs if not any(row["run"] == r.name for row in rows)]
    text = f"# {study.name}\n\n"
    if study.description:
        text += study.description.strip() + "\n\n"
    if not rows:
        text += "Nothing evaluated yet.\n"
        (out / "report.md").write_text(text)
        return text
    rank_key = "combined" if all(r["combined"] is not None for r in rows) else "combined (offline)"
    if study.kind == "sweep":
        rows.sort(key=lambda r: r[rank_key])
    swept = [k for k in rows[0] if k not in ("run", "model", "export", "epochs", "grid", *STUDY_METRICS)]
    text += (f"Ranked by {rank_key}. `combined` is the seeds' `FID + 10 / max(IS, 0.1) + 10 * LPIPS` on Inception "
             "features; `combined (offline)` is the same formula on the offline classifier's features (its "
             "classifier score in place of IS). Diversity is within-class feature spread relative to real images; "
             "`flagged` counts classes below 0.8 (collapse). LPIPS is n/a without the `lpips` package.\n\n")
    best_epochs = {}
    if study.kind == "experiment":
        for r in rows:
            if r["export"] == "best":
                best_epochs[r["run"]] = r["epochs"]
        text += "## Best and final export of each model\n\n"
        text += _table(rows, ["run", "model", "export", "epochs", *STUDY_METRICS])
    else:
        text += "## Every export\n\n" + _table(rows, ["run", *swept, "epochs", *STUDY_METRICS])
        best = rows[0]
        text += (f"\n**Best by {rank_key}:** {best['run']} at {best['epochs']} epochs "
                 f"({rank_key} {_fmt(best[rank_key])}, offline FID {_fmt(best['offline FID'])}, "
                 f"accuracy {_fmt(best['accuracy'])}, {best['flagged']} flagged classes).\n")
        for factor in [*swept, "epochs"]:
            text += f"\n### By {factor} (means over the other factors)\n\n"
            summary = factor_summary(rows, factor, rank_key)
            text += _table(summary, list(summary[0]))
    if plot_eval_curves(study, out / "curves.png", best_epochs):
        text += "\n## Offline FID and accuracy per epoch during training\n\n![curves](curves.png)\n"
    grid_matrix(rows, out / "grids.png")
    text += "\n## Samples (one row per class, the same seeds in every panel)\n\n![grids](grids.png)\n"
    notes = [inception_note] if inception_note else []
    if missing:
        notes.append(f"not evaluated yet (untrained or failed): {', '.join(missing)}")
    if notes:
        text += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"rank_key": rank_key, "rows": rows}, indent=2, default=str))
    return text
