"""The run report: a heatmap picture per test slide, the ROC curve, and an HTML/Markdown summary.

``write_report`` turns an :class:`~digilut.evaluate.Evaluation` into files a person opens first:
``report.html`` (self-contained, pictures inlined: the KFP UI shows it as an HTML artifact),
``report.md``, ``pictures/<slide>.png`` and ``roc.png``; ``roc_points`` gives the curve for KFP's
``ClassificationMetrics``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import roc_curve

from digilut.evaluate import Evaluation
from digilut.geojson import GEOJSON_DIR
from digilut.heatmap import Heatmap, build_heatmaps
from digilut.predict import ORIGINAL_METHOD
from digilut.render import render_heatmap_png

log = logging.getLogger(__name__)
MAX_ROC_POINTS = 200  # KFP's UI draws a few hundred points well


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """(fpr, tpr, thresholds) of the ROC curve, thinned to at most MAX_ROC_POINTS, JSON-safe."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return [], [], []
    fpr, tpr, thr = roc_curve(labels, probs)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), MAX_ROC_POINTS)).round().astype(int))
    thr = np.clip(thr[keep], 0.0, 1.0)  # sklearn's first threshold is +inf
    return fpr[keep].tolist(), tpr[keep].tolist(), thr.tolist()


def _roc_png(labels: np.ndarray, probs: np.ndarray, auroc: float, path: Path) -> Path | None:
    fpr, tpr, _ = roc_points(labels, probs)
    if not fpr:
        return None
    fig = Figure(figsize=(4.2, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#c2185b", lw=2, label=f"ensemble (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Test patches: ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _slide_section(out: Path, slide: str, picture: Path) -> str:
    """A slide's heading with links to its picture and GeoJSON (relative to ``out``), and the picture."""
    links = [f'<a href="{html.escape(picture.relative_to(out).as_posix())}">picture</a>']
    geojson = out / GEOJSON_DIR / f"{Path(slide).stem}.geojson"
    if geojson.is_file():
        links.append(f'<a href="{html.escape(geojson.relative_to(out).as_posix())}">GeoJSON (QuPath)</a>')
    return f"<h4>{html.escape(slide)}: {' · '.join(links)}</h4>" + _img_tag(picture, slide)


def write_report(
    ev: Evaluation,
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    out_dir: str | Path,
    *,
    thumbnails: str | Path | None = None,
    title: str = "digilut run",
    heatmaps: Mapping[str, Heatmap] | None = None,
    models: Sequence[str] = (),
) -> Path:
    """Write the report files into ``out_dir``; return the path of ``report.html``.

    ``models``: one line of words per ensemble model (e.g. its fold and initialisation).

    ``pred``: test patches with ``prob`` and ``label``; ``thumbnails``: a folder of ``<stem>.png``
    and ``slides.json`` (level-0 sizes) from the merge step, optional; ``heatmaps``: those of
    ``pred`` when already built. Each slide's picture is linked, and its ``geojson/<stem>.geojson``
    (boxes and heatmap contours for QuPath) when ``out_dir`` has one.
    """
    out = Path(out_dir)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    hms = dict(heatmaps) if heatmaps is not None else build_heatmaps(pred) if len(pred) else {}
    pictures = _slide_pictures(ev, pred, truth, out / "pictures", thumbnails, hms)
    roc = (
        _roc_png(pred["label"].to_numpy(), pred["prob"].to_numpy(), ev.patch.auroc, out / "roc.png")
        if len(pred)
        else None
    )
    report = out / "report.html"
    report.write_text(_html(ev, out, title, models, roc, pictures))
    (out / "report.md").write_text(_markdown(ev, title, models))
    log.info("report: %s (%d pictures)", report, len(pictures))
    return report


def _slide_pictures(
    ev: Evaluation,
    pred: pd.DataFrame,
    truth: pd.DataFrame,
    pics: Path,
    thumbnails: str | Path | None,
    hms: Mapping[str, Heatmap],
) -> list[tuple[str, Path]]:
    """``pics/<stem>.png`` per slide of ``pred``: thumbnail, heatmap, truth and predicted boxes."""
    sizes: dict[str, dict[str, int]] = {}
    if thumbnails is not None and (Path(thumbnails) / "slides.json").is_file():
        sizes = json.loads((Path(thumbnails) / "slides.json").read_text())
    f2_of = (
        dict(zip(ev.score.slides["slide"], ev.score.slides["f2"], strict=True))
        if len(ev.score.slides)
        else {}
    )
    pictures: list[tuple[str, Path]] = []
    for slide in sorted(set(pred["slide"]) if len(pred) else []):
        stem = Path(slide).stem
        thumb_path = Path(thumbnails) / f"{stem}.png" if thumbnails is not None else None
        thumb = (
            np.asarray(Image.open(thumb_path)) if thumb_path is not None and thumb_path.is_file() else None
        )
        size = sizes.get(slide)
        if size is None:  # no thumbnail info: the patch extent bounds the slide
            rows = pred[pred["slide"] == slide]
            size = {"width": int((rows.x0 + rows.w0).max()), "height": int((rows.y0 + rows.h0).max())}
        path = render_heatmap_png(
            thumb,
            (size["width"], size["height"]),
            hms.get(slide),
            truth[truth["filename"] == slide],
            ev.boxes[ev.boxes["filename"] == slide],
            pics / f"{stem}.png",
            f2=f2_of.get(slide),
            n=int((truth["filename"] == slide).sum()) or None,
        )
        pictures.append((slide, path))
    return pictures


def _html(
    ev: Evaluation,
    out: Path,
    title: str,
    models: Sequence[str],
    roc: Path | None,
    pictures: list[tuple[str, Path]],
) -> str:
    """``report.html``: self-contained, its pictures inlined."""
    p, o = ev.patch, ORIGINAL_METHOD
    table = ev.score.slides.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}td,th{padding:2px 8px;"
        "text-align:right}table{border-collapse:collapse}tr:nth-child(even){background:#f3f3f3}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<h2>DigiLut mean F2 = {ev.score.mean_f2:.4f}</h2>",
        f"<p>{len(ev.score.slides)} test slide(s) with lesions; boxes: {html.escape(ev.boxes_config.method)}"
        + (
            f", tuned on out-of-fold slides (OOF mean F2 {ev.tuned_f2:.4f})"
            if ev.tuned_f2 is not None
            else ""
        )
        + "</p>",
        "<h3>Patch metrics (test patients)</h3>",
        "<table><tr><th></th><th>this model</th><th>original method</th></tr>",
        f"<tr><td>AUROC</td><td>{p.auroc:.4f}</td><td>—</td></tr>",
        f"<tr><td>precision</td><td>{p.precision:.4f}</td><td>{o['precision']:.3f}</td></tr>",
        f"<tr><td>recall</td><td>{p.recall:.4f}</td><td>{o['recall']:.3f}</td></tr>",
        f"<tr><td>F1</td><td>{p.f1:.4f}</td><td>{o['f1']:.3f}</td></tr></table>",
        f"<p>threshold {p.threshold:.3f}; {p.patches} patches, {p.positives} positive</p>",
        ("<h3>Models</h3><ul>" + "".join(f"<li>{html.escape(m)}</li>" for m in models) + "</ul>")
        if models
        else "",
        _img_tag(roc, "ROC curve") if roc else "",
        f"<h3>Per slide</h3>{table}",
        "<h3>Heatmaps</h3><p>truth boxes green, predicted boxes red. Each slide's GeoJSON holds its boxes "
        "and heatmap contours in level-0 pixels: in QuPath, open the slide, then File → Import objects.</p>",
        *(_slide_section(out, slide, path) for slide, path in pictures),
        "</body></html>",
    ]
    return "\n".join(parts)


def _markdown(ev: Evaluation, title: str, models: Sequence[str]) -> str:
    """``report.md``: the headline figures (the KFP UI's Markdown artifact)."""
    p, o = ev.patch, ORIGINAL_METHOD
    md = [
        f"# {title}",
        f"**DigiLut mean F2 = {ev.score.mean_f2:.4f}** over {len(ev.score.slides)} test slide(s)",
        "",
        "| patch metric | this model | original method |",
        "|---|---|---|",
        f"| AUROC | {p.auroc:.4f} | — |",
        f"| precision | {p.precision:.4f} | {o['precision']:.3f} |",
        f"| recall | {p.recall:.4f} | {o['recall']:.3f} |",
        f"| F1 | {p.f1:.4f} | {o['f1']:.3f} |",
        "",
        "```",
        ev.score.format_table(),
        "```",
        *(["", "Models:", *(f"- {m}" for m in models)] if models else []),
    ]
    return "\n".join(md) + "\n"


@dataclass(frozen=True)
class RunFigures:
    """What the KFP UI shows of a run: scalars, the ROC curve and the confusion matrix."""

    scalars: dict[str, float]
    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]
    confusion: list[list[int]]  # rows = truth (no lesion, lesion), columns = prediction


def run_figures(ev: Evaluation, pred: pd.DataFrame) -> RunFigures:
    """The figures of an evaluation over the test patches ``pred`` (``label``, ``prob``)."""
    labels = pred["label"].to_numpy().astype(bool)
    called = pred["prob"].to_numpy() >= ev.patch.threshold
    confusion = [
        [int((~labels & ~called).sum()), int((~labels & called).sum())],
        [int((labels & ~called).sum()), int((labels & called).sum())],
    ]
    scalars = {
        "mean_f2": ev.score.mean_f2,
        "patch_auroc": ev.patch.auroc,
        "patch_precision": ev.patch.precision,
        "patch_recall": ev.patch.recall,
        "patch_f1": ev.patch.f1,
        "patch_threshold": ev.patch.threshold,
        "test_slides_scored": float(len(ev.score.slides)),
    }
    if ev.tuned_f2 is not None:
        scalars["oof_mean_f2"] = ev.tuned_f2
    fpr, tpr, thr = roc_points(labels, pred["prob"].to_numpy())
    return RunFigures({k: float(v) for k, v in scalars.items() if v == v}, fpr, tpr, thr, confusion)
