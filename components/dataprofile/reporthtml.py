"""The report's data section: one self-contained HTML fragment (inline CSS and SVG, thumbnails as data: URIs; no
script, font, stylesheet or image is fetched), to be placed inside the evaluation report's <body>.

Shows: the drift verdict and its reasons, class-share bars (this run vs the champion), the size, file-size,
brightness and contrast histograms (both runs, as shares of images per fixed bin), a table per split (counts,
formats, colour modes, grey images, mean brightness and contrast, exact duplicates), and the near-duplicate pairs
that straddled splits as thumbnails side by side, with both file names, splits and the distance.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from html import escape

from kfp_finetune.components.dataprofile.drift import DriftResult
from kfp_finetune.components.dataprofile.leakage import LeakageResult
from kfp_finetune.components.dataprofile.profile import EDGES, Profile, SplitProfile

THUMB_SIDE = 96
MAX_PAIRS = 24
COLOURS = {"current": "#1f77b4", "baseline": "#b0b0b0"}
SHOWN_HISTOGRAMS = ("width", "height", "aspect", "file_size", "brightness", "contrast")
_CSS = """
.dp{font:14px/1.4 system-ui,sans-serif}
.dp .dp-charts{display:flex;flex-wrap:wrap;gap:16px}
.dp .dp-pairs{display:flex;flex-wrap:wrap;gap:12px}
.dp figure{margin:0;padding:6px;border:1px solid #ddd;background:#fafafa;max-width:230px}
.dp figure img{width:96px;height:96px;object-fit:contain;background:#eee;margin-right:4px}
.dp figcaption{font-size:12px;word-break:break-all}
.dp table{border-collapse:collapse;margin:8px 0}
.dp td,.dp th{border:1px solid #ddd;padding:2px 8px;text-align:right}
.dp .dp-ok{color:#1a7f37}.dp .dp-bad{color:#b42318}.dp .dp-muted{color:#666}
.dp .dp-key{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
"""


def thumbnail_uri(image_bytes: bytes, side: int = THUMB_SIDE) -> str:
    """A small JPEG data: URI of an encoded image; '' when it cannot be decoded (a thumbnail never fails a report)."""
    from PIL import Image

    from kfp_finetune.components.dataprofile.hashing import to_rgb

    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.load()
            rgb = to_rgb(img)
            rgb.thumbnail((side, side))
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _legend(has_baseline: bool) -> str:
    key = (f'<span class="dp-key" style="background:{COLOURS["current"]}"></span>this run')
    if has_baseline:
        key += f'<span class="dp-key" style="background:{COLOURS["baseline"]}"></span>champion'
    return f'<p class="dp-muted">{key}</p>'


def class_share_svg(current: SplitProfile, baseline: SplitProfile | None, width: int = 520) -> str:
    """Horizontal bars: each class's share in this run, and in the champion's data beneath it."""
    classes = sorted(set(current.classes) | set(baseline.classes if baseline else {}))
    cs, bs = current.shares, (baseline.shares if baseline else {})
    row = 30 if baseline else 18
    label_w, plot_w = 130, width - 130 - 60
    top = max((*cs.values(), *bs.values(), 0.01))
    parts = [f'<svg width="{width}" height="{row * len(classes) + 8}" role="img" aria-label="class shares">']
    for i, c in enumerate(classes):
        y = 4 + i * row
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end" font-size="12">{escape(c)}</text>')
        series = [("current", cs.get(c, 0.0))] + ([("baseline", bs.get(c, 0.0))] if baseline else [])
        for k, (kind, share) in enumerate(series):
            w = plot_w * share / top
            yy = y + k * 13
            parts.append(f'<rect x="{label_w}" y="{yy}" width="{w:.1f}" height="11" fill="{COLOURS[kind]}"/>')
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{yy + 10}" font-size="11">{share:.1%}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bin_label(name: str, x: float) -> str:
    if name == "file_size":
        return f"{x / 1024:g}K" if x < 1 << 20 else f"{x / (1 << 20):g}M"
    return f"{x:g}"


def histogram_svg(name: str, current: SplitProfile, baseline: SplitProfile | None, width: int = 300,
                  height: int = 150) -> str:
    """Bars of the share of images per bin (this run, and the champion's beside it), over the bins either uses."""
    edges = EDGES[name]
    cur = current.histograms[name]
    base = baseline.histograms[name] if baseline else [0] * len(edges)
    used = [i for i in range(len(edges)) if cur[i] or base[i]]
    if not used:
        return f'<p class="dp-muted">no {escape(name)} data</p>'
    lo, hi = used[0], used[-1]
    bins = list(range(lo, hi + 1))
    nc, nb = max(sum(cur), 1), max(sum(base), 1)
    top = max(max(cur[i] / nc for i in bins), max(base[i] / nb for i in bins), 1e-9)
    left, bottom, plot_h = 8, 30, height - 30 - 18
    slot = (width - 2 * left) / len(bins)
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{escape(name)} histogram">',
             f'<text x="{left}" y="12" font-size="12" font-weight="bold">{escape(name)}</text>']
    for k, i in enumerate(bins):
        x = left + k * slot
        series = [("current", cur[i] / nc)] + ([("baseline", base[i] / nb)] if baseline else [])
        upper = _bin_label(name, edges[i + 1]) if i + 1 < len(edges) else "up"
        span = f"{_bin_label(name, edges[i])}-{upper}"
        bar_w = (slot - 2) / len(series)
        for s, (kind, share) in enumerate(series):
            h = plot_h * share / top
            parts.append(f'<rect x="{x + 1 + s * bar_w:.1f}" y="{18 + plot_h - h:.1f}" width="{bar_w:.1f}" '
                         f'height="{h:.1f}" fill="{COLOURS[kind]}"><title>{escape(name)} {escape(span)}: '
                         f'{share:.1%} ({"this run" if kind == "current" else "champion"})</title></rect>')
        if k % max(1, len(bins) // 6) == 0:
            parts.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" font-size="10">'
                         f"{escape(_bin_label(name, edges[i]))}</text>")
    parts.append(f'<line x1="{left}" x2="{width - left}" y1="{18 + plot_h}" y2="{18 + plot_h}" stroke="#999"/>')
    parts.append("</svg>")
    return "".join(parts)


def _split_table(profile: Profile) -> str:
    head = ["split", "images", "classes", "formats", "colour modes", "grey", "brightness", "contrast",
            "exact duplicates"]
    rows = []
    named = [*profile.splits.items(), ("all", profile.overall())]
    for name, s in named:
        fmt = ", ".join(f"{k} {v}" for k, v in sorted(s.categories["format"].items()))
        mode = ", ".join(f"{k} {v}" for k, v in sorted(s.categories["mode"].items()))
        rows.append([name, s.count, len(s.classes), fmt, mode, s.categories["tone"].get("grey", 0),
                     f"{s.mean_brightness:.1f}", f"{s.mean_contrast:.1f}", s.exact_duplicates])
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _pairs_html(leakage: LeakageResult, images: Callable[[str], bytes | None] | None, max_pairs: int) -> str:
    s = leakage.summary()
    text = (f"{s['cross_split_pairs']} near-duplicate pair(s) across splits ({s['exact_pairs']} exact, "
            f"{s['label_conflicts']} with different labels), threshold {s['threshold']} bits; policy "
            f"<b>{escape(leakage.policy)}</b>: {s['moved']} image(s) moved in {s['groups']} group(s)")
    if not leakage.pairs:
        return f'<p class="dp-ok">{text}</p>'
    figures = []
    for p in leakage.pairs[:max_pairs]:
        imgs = []
        for ident, name in ((p.a_id, p.a_name), (p.b_id, p.b_name)):
            data = images(ident) if images else None
            uri = thumbnail_uri(data) if data else ""
            imgs.append(f'<img src="{uri}" alt="{escape(name or ident)}">' if uri else
                        '<span class="dp-muted">(no preview)</span>')
        moved = [f"{escape(x)} -> {escape(leakage.moves[x])}" for x in (p.a_id, p.b_id) if x in leakage.moves]
        caption = (f"{escape(p.a_name or p.a_id)} [{escape(p.a_split)}]<br>{escape(p.b_name or p.b_id)} "
                   f"[{escape(p.b_split)}]<br>{escape(p.kind)}, {p.distance} bits"
                   + ("" if not p.label_conflict else
                      f'<br><span class="dp-bad">labels {escape(p.a_label)} / {escape(p.b_label)}</span>')
                   + (f'<br><span class="dp-muted">moved: {"; ".join(moved)}</span>' if moved else ""))
        figures.append(f"<figure>{''.join(imgs)}<figcaption>{caption}</figcaption></figure>")
    more = len(leakage.pairs) - max_pairs
    tail = f'<p class="dp-muted">and {more} more pair(s): see ingest_report.json</p>' if more > 0 else ""
    return f'<p class="dp-bad">{text}</p><div class="dp-pairs">{"".join(figures)}</div>{tail}'


def html_section(
    profile: Profile,
    baseline: Profile | None = None,
    leakage: LeakageResult | None = None,
    images: Mapping[str, bytes] | Callable[[str], bytes | None] | None = None,
    drift: DriftResult | None = None,
    max_pairs: int = MAX_PAIRS,
    histograms: Sequence[str] = SHOWN_HISTOGRAMS,
) -> str:
    """The data section as an HTML fragment (a <section> with its own <style>).

    images: the encoded bytes of the images in leaked pairs, by record id (a dict, or a function returning None
    when unavailable); they become small JPEG data: URIs.
    """
    getter: Callable[[str], bytes | None] | None
    if images is None or callable(images):
        getter = images
    else:
        mapping = images
        getter = mapping.get
    cur = profile.overall()
    base = baseline.overall() if baseline else None
    parts = [f"<section class=\"dp\"><style>{_CSS}</style><h2>Data</h2>"]
    if drift is not None:
        cls = "dp-ok" if drift.verdict == "pass" else "dp-bad"
        reasons = "".join(f"<li>{escape(f.reason)}</li>" for f in drift.findings)
        parts.append(f'<p class="{cls}">drift against the champion\'s data: <b>{escape(drift.verdict)}</b> '
                     f'(policy {escape(drift.policy)}){" · " + escape(drift.note) if drift.note else ""}</p>'
                     + (f"<ul>{reasons}</ul>" if reasons else ""))
    elif baseline is None:
        parts.append('<p class="dp-muted">no champion profile to compare with</p>')
    parts.append("<h3>Class shares</h3>" + _legend(base is not None) + class_share_svg(cur, base))
    charts = "".join(f"<div>{histogram_svg(name, cur, base)}</div>" for name in histograms)
    parts.append("<h3>Image sizes, file sizes, brightness, contrast</h3>" + _legend(base is not None)
                 + f'<div class="dp-charts">{charts}</div>')
    parts.append("<h3>Per split</h3>" + _split_table(profile))
    if leakage is not None:
        parts.append("<h3>Near-duplicates across splits</h3>" + _pairs_html(leakage, getter, max_pairs))
    parts.append("</section>")
    return "".join(parts)


def page(fragment: str, title: str = "Data profile") -> str:
    """A whole page around a fragment (for `kfp-finetune profile --html` or a quick look)."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title></head>'
            f"<body>{fragment}</body></html>\n")
