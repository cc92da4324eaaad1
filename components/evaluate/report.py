"""The evaluation report: one self-contained HTML page (inline SVG and data URIs, no scripts, fonts or network).

Sections: headline metrics and the blessing decision, training curves of every phase (from model.json `history`),
a confusion-matrix heatmap, calibration (ECE/NLL before and after temperature scaling, a reliability diagram), the
LiteRT models when export converted some, the per-class table, the dataset summary (from the ingest report) and
thumbnails of the worst mistakes. Pure Python: no TensorFlow import, so it can be unit-tested and rendered quickly.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

THUMB_SIDE = 128
CURVE_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e"}
PHASE_ORDER = ("train_head", "fine_tune")


@dataclass(frozen=True)
class Mistake:
    """One misclassified example: its encoded image, true/predicted class and the predicted class's probability."""

    index: int
    true_name: str
    predicted_name: str
    confidence: float
    image_bytes: bytes


def thumbnail_data_uri(image_bytes: bytes, side: int = THUMB_SIDE) -> str:
    """A small JPEG data URI of an encoded image (any format Pillow reads); '' when it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img = img.convert("RGB")
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
    except Exception:  # a thumbnail is decoration: never fail the report for one
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- SVG pieces ----------------------------------------------------------------------------------------------------


def _polyline(points: Sequence[tuple[float, float]], colour: str, dashed: bool = False) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dash = ' stroke-dasharray="5,3"' if dashed else ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{coords}"/>'


def curve_svg(history: dict[str, dict[str, list[float]]], metric: str, width: int = 520, height: int = 260) -> str:
    """Line chart of `metric` and `val_<metric>` across the phases in order, a dashed line at each phase change."""
    phases = [p for p in PHASE_ORDER if p in history] + [p for p in history if p not in PHASE_ORDER]
    train: list[float] = []
    val: list[float] = []
    boundaries: list[tuple[int, str]] = []
    for phase in phases:
        values = history.get(phase) or {}
        n = max(len(values.get(metric, [])), len(values.get(f"val_{metric}", [])))
        if not n:
            continue
        boundaries.append((len(train), phase))
        t = [float(x) for x in values.get(metric, [])]
        v = [float(x) for x in values.get(f"val_{metric}", [])]
        train += t + [float("nan")] * (n - len(t))
        val += v + [float("nan")] * (n - len(v))
    finite = [x for x in train + val if x == x]
    if not finite:
        return f'<p class="muted">no {escape(metric)} history in model.json</p>'
    left, right, top, bottom = 48, 12, 24, 32
    lo, hi = min(finite), max(finite)
    if metric == "accuracy":
        lo, hi = min(lo, 0.0), max(hi, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    epochs = len(train)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i: int, value: float) -> tuple[float, float]:
        x = left + (plot_w * (i / (epochs - 1)) if epochs > 1 else plot_w / 2)
        return x, top + plot_h * (1 - (value - lo) / (hi - lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(metric)} per epoch">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    for k in range(5):  # horizontal grid with labels
        value = lo + (hi - lo) * k / 4
        _, y = xy(0, value)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:.3g}</text>')
    for start, phase in boundaries:
        x, _ = xy(start, lo)
        if start:
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#999" '
                         'stroke-dasharray="4,4"/>')
        anchor, dx = ("end", -4) if x > left + 0.7 * plot_w else ("start", 4)  # keep labels inside the chart
        parts.append(f'<text x="{x + dx:.1f}" y="{top - 6}" text-anchor="{anchor}" font-size="11" fill="#555">'
                     f'{escape(phase)}</text>')
    for series, colour, dashed in ((train, CURVE_COLOURS["train"], False), (val, CURVE_COLOURS["val"], True)):
        run: list[tuple[float, float]] = []
        for i, value in enumerate(series):
            if value == value:
                run.append(xy(i, value))
            elif run:
                parts.append(_polyline(run, colour, dashed))
                run = []
        if run:
            parts.append(_polyline(run, colour, dashed) if len(run) > 1 else
                         f'<circle cx="{run[0][0]:.1f}" cy="{run[0][1]:.1f}" r="3" fill="{colour}"/>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" font-size="11">'
                 f'epoch (1..{epochs})</text>')
    legend_x = left + plot_w - 150
    parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{top + 12}" y2="{top + 12}" '
                 f'stroke="{CURVE_COLOURS["train"]}" stroke-width="2"/>'
                 f'<text x="{legend_x + 22}" y="{top + 16}" font-size="11">train {escape(metric)}</text>')
    parts.append(f'<line x1="{legend_x}" x2="{legend_x + 18}" y1="{top + 28}" y2="{top + 28}" '
                 f'stroke="{CURVE_COLOURS["val"]}" stroke-width="2" stroke-dasharray="5,3"/>'
                 f'<text x="{legend_x + 22}" y="{top + 32}" font-size="11">validation</text>')
    parts.append("</svg>")
    return "".join(parts)


def confusion_svg(matrix: Sequence[Sequence[int]], class_names: Sequence[str], cell: int = 0) -> str:
    """Heatmap of the confusion matrix (rows: true class, columns: predicted), shaded by row-normalised share."""
    n = len(class_names)
    cell = cell or max(28, min(64, 560 // max(n, 1)))
    label_w = min(160, 8 + 7 * max((len(c) for c in class_names), default=4))
    top = label_w
    width, height = label_w + n * cell + 10, top + n * cell + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="confusion matrix">']
    for j, name in enumerate(class_names):  # column labels, rotated
        x = label_w + j * cell + cell / 2
        parts.append(f'<text transform="translate({x + 4:.1f},{top - 6}) rotate(-60)" font-size="11">'
                     f'{escape(name)}</text>')
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y = top + i * cell
        parts.append(f'<text x="{label_w - 6}" y="{y + cell / 2 + 4:.1f}" text-anchor="end" font-size="11">'
                     f'{escape(class_names[i])}</text>')
        for j, count in enumerate(row):
            share = count / total
            hue = "34,139,34" if i == j else "200,40,40"
            fill = f"rgba({hue},{0.08 + 0.92 * share:.3f})" if count else "#fff"
            text = "#fff" if share > 0.55 else "#111"
            x = label_w + j * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#ddd">'
                         f'<title>true {escape(class_names[i])}, predicted {escape(class_names[j])}: {count}</title>'
                         f'</rect>')
            parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" text-anchor="middle" '
                         f'font-size="12" fill="{text}">{count}</text>')
    parts.append("</svg>")
    return "".join(parts)


def reliability_svg(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]] | None = None,
                    size: int = 300) -> str:
    """Reliability diagram: accuracy per confidence bin (bars: before calibration; dots: after), with the diagonal
    of perfect calibration. Bins are the equal-width ones of components.evaluate.calibration (lower, upper, count,
    accuracy, confidence)."""
    left, top, pad = 44, 12, 34
    side = size - left - 12
    width, height = size, top + side + pad

    def xy(conf: float, acc: float) -> tuple[float, float]:
        return left + side * conf, top + side * (1 - acc)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="reliability diagram">',
             f'<rect x="{left}" y="{top}" width="{side}" height="{side}" fill="#fafafa" stroke="#ccc"/>']
    for k in range(6):
        v = k / 5
        x, y = xy(v, v)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{v:.1f}</text>')
        parts.append(f'<text x="{x:.1f}" y="{top + side + 14}" text-anchor="middle" font-size="11">{v:.1f}</text>')
    x0, y0 = xy(0, 0)
    x1, y1 = xy(1, 1)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#999" stroke-dasharray="4,4"/>')
    for b in before:
        if not b["count"]:
            continue
        bx, by = xy(b["lower"], b["accuracy"])
        parts.append(f'<rect x="{bx:.1f}" y="{by:.1f}" width="{side * (b["upper"] - b["lower"]):.1f}" '
                     f'height="{top + side - by:.1f}" fill="{CURVE_COLOURS["train"]}" fill-opacity="0.55" '
                     f'stroke="#fff"><title>confidence {b["lower"]:.2f}-{b["upper"]:.2f}: {b["count"]} examples, '
                     f'accuracy {b["accuracy"]:.3f}, mean confidence {b["confidence"]:.3f}</title></rect>')
    for b in after or ():
        if b["count"]:
            cx, cy = xy(b["confidence"], b["accuracy"])
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{CURVE_COLOURS["val"]}">'
                         f'<title>after calibration: {b["count"]} examples, accuracy {b["accuracy"]:.3f}, '
                         f'mean confidence {b["confidence"]:.3f}</title></circle>')
    parts.append(f'<text x="{left + side / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="11">'
                 'confidence (top-1 probability)</text>')
    parts.append("</svg>")
    return "".join(parts)


def calibration_section(calibration: dict[str, Any] | None) -> str:
    """ECE and NLL before and after temperature scaling, the temperature, and the reliability diagram."""
    if not calibration:
        return '<p class="muted">no calibration in this evaluation</p>'
    c = calibration
    fitted = c.get("status") == "fitted"
    rows = [["ECE", c["before"]["ece"], c["after"]["ece"]], ["NLL", c["before"]["nll"], c["after"]["nll"]]]
    val = c.get("validation")
    if val:
        rows += [["validation ECE", val["before"]["ece"], val["after"]["ece"]],
                 ["validation NLL", val["before"]["nll"], val["after"]["nll"]]]
    head = (f'<p>temperature <b>T = {c["temperature"]:.3f}</b>, fitted on the validation split by minimising NLL; '
            "the export serves softmax(log(p) / T). " if fitted else
            f'<p class="muted">not calibrated ({escape(str(c.get("reason") or c.get("status")))}): T = 1. ')
    head += (f'ECE: {int(c["ece_bins"])} equal-width bins of the top-1 confidence, on split '
             f'<b>{escape(str(c["split"]))}</b>.{" " + escape(c["note"]) if c.get("note") else ""}</p>')
    legend = ('<p class="muted">bars: accuracy per confidence bin before calibration; dots: after (at their mean '
              "confidence); dashed: perfect calibration</p>")
    return (head + _table(["", "before", "after"], rows) + legend
            + reliability_svg(c["reliability_before"], c["reliability_after"] if fitted else None))


def tflite_section(tflite: dict[str, Any] | None) -> str:
    """The LiteRT models export converted and checked (components/export/tflite_export.py): one row per model."""
    if not tflite or not tflite.get("models"):
        return ""
    rows = []
    for name, m in tflite["models"].items():
        if m.get("error"):
            rows.append([name, "-", "-", "-", "-", "-", f"conversion failed: {m['error']}"])
            continue
        rows.append([name, m["accuracy"], m["accuracy_drop"], m["top1_agreement"], f'{m["size_bytes"] / 1e6:.2f} MB',
                     f'{m["latency_ms"]:.2f} ms', "pushed" if m.get("push") else f'not pushed: {m.get("reason", "")}'])
    keras = tflite.get("keras") or {}
    note = (f'<p class="muted">on split {escape(str(tflite.get("split")))} ({tflite.get("examples")} images, the '
            f'serving decode and resize); Keras accuracy {format_value(keras.get("accuracy"))}; latency: median '
            "single-image CPU time with the LiteRT interpreter, 1 thread; max_tflite_drop "
            f'{format_value(tflite.get("max_tflite_drop"))}</p>')
    return ("<h2>LiteRT (TFLite) models</h2>" + note
            + _table(["model", "accuracy", "drop vs Keras", "top-1 agreement", "size", "latency", "push"], rows))


# --- the page --------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#111;
max-width:1150px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.card b{display:block;font-size:20px}.ok{color:#1a7f37}.bad{color:#c62828}.muted{color:#777}
.curves{display:flex;flex-wrap:wrap;gap:16px}.mistakes{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:140px;font-size:12px}figure img{width:128px;height:128px;object-fit:contain;
background:#eee;border:1px solid #ccc}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(format_value(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def format_value(value: Any) -> str:
    """A metric as shown in reports and summaries: floats with 4 decimals."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _dataset_section(ingest_report: dict[str, Any], class_names: Sequence[str]) -> str:
    counts = ingest_report.get("counts") or {}
    splits = [s for s in ("train", "validation", "test") if s in counts] + [s for s in counts if s not in
                                                                           ("train", "validation", "test")]
    rows = [[name, *[(counts.get(s) or {}).get(name, 0) for s in splits]] for name in class_names]
    rows.append(["total", *[sum((counts.get(s) or {}).values()) for s in splits]])
    skipped = ingest_report.get("skipped_counts") or {}
    skipped_text = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
    info = [f"source: <code>{escape(str(ingest_report.get('source', '?')))}</code>",
            f"seed: {escape(str(ingest_report.get('seed', '?')))}",
            f"skipped files: {len(ingest_report.get('skipped') or [])} ({escape(skipped_text)})"]
    return "<p>" + " · ".join(info) + "</p>" + _table(["class", *splits], rows)


def render(
    evaluation: dict[str, Any],
    model_meta: dict[str, Any],
    ingest_report: dict[str, Any],
    mistakes: Sequence[Mistake],
    data_html: str = "",
) -> str:
    """The whole report page as one HTML string."""
    m = evaluation["metrics"]
    names = evaluation["class_names"]
    blessing = evaluation["blessing"]
    verdict = ('<b class="ok">blessed</b>' if blessing["blessed"] else '<b class="bad">not blessed</b>')
    cards = [("accuracy", m["accuracy"]), ("loss", m["loss"]), (f"top-{m['top_k']} accuracy", m["top_k_accuracy"]),
             ("macro F1", m["macro_f1"]), ("weighted F1", m["weighted_f1"]), ("examples", m["num_examples"])]
    cards_html = "".join(
        f'<div class="card">{escape(label)}<b>{escape(format_value(v))}</b></div>' for label, v in cards
    )
    rules = "".join(
        f'<li class="{"ok" if r["passed"] else "bad"}">{escape(r["rule"])}: {escape(r["detail"])}</li>'
        for r in blessing["rules"])
    history = model_meta.get("history") or {}
    curves = "".join(f"<div><h3>{metric}</h3>{curve_svg(history, metric)}</div>" for metric in ("accuracy", "loss"))
    per_class = evaluation["per_class"]
    class_rows = [[c, per_class[c]["precision"], per_class[c]["recall"], per_class[c]["f1"], per_class[c]["support"]]
                  for c in names]
    if mistakes:
        figures = []
        for mk in mistakes:
            uri = thumbnail_data_uri(mk.image_bytes)
            img = f'<img src="{uri}" alt="example {mk.index}">' if uri else '<div class="muted">(no preview)</div>'
            figures.append(f"<figure>{img}<figcaption>true <b>{escape(mk.true_name)}</b><br>predicted "
                           f'<b class="bad">{escape(mk.predicted_name)}</b> ({mk.confidence:.1%})'
                           "</figcaption></figure>")
        mistakes_html = f'<div class="mistakes">{"".join(figures)}</div>'
    else:
        mistakes_html = '<p class="ok">no mistakes on this split</p>'
    backbone = model_meta.get("backbone") or {}
    model_line = (f"backbone {escape(str(backbone.get('keras_name') or backbone.get('name') or '?'))}, "
                  f"input {escape(str(model_meta.get('input_size', '?')))} px, phase "
                  f"{escape(str(model_meta.get('phase', '?')))}")
    guard = evaluation.get("fine_tune_guard")
    guard_html = (f'<p class="{"ok" if guard["kept"] == "final" else "bad"}">Fine-tune guard: '
                  f'{escape(str(guard["message"]))}</p>' if guard else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body>
<h1>Evaluation report: {verdict}</h1>
<p class="muted">model <code>{escape(str(evaluation["model"]))}</code> ({model_line}) on split
<b>{escape(evaluation["split"])}</b> of <code>{escape(str(evaluation["dataset"]))}</code> ·
{escape(evaluation["created"])}</p>
<div class="cards">{cards_html}</div>
<h2>Blessing</h2><ul>{rules}</ul>
<h2>Training curves</h2>{guard_html}<div class="curves">{curves}</div>
<h2>Confusion matrix</h2><p class="muted">rows: true class · columns: predicted class</p>
{confusion_svg(evaluation["confusion_matrix"], names)}
<h2>Calibration</h2>{calibration_section(evaluation.get("calibration"))}
{tflite_section(evaluation.get("tflite"))}
<h2>Per class</h2>{_table(["class", "precision", "recall", "F1", "support"], class_rows)}
<h2>Worst mistakes</h2><p class="muted">misclassified examples, most confident first</p>{mistakes_html}
<h2>Dataset</h2>{_dataset_section(ingest_report, names)}
{data_html}
</body></html>
"""
