"""The HTML report: one self-contained file (figures embedded as PNG data URIs, no network).

What a model owner needs to judge the recommendation, in order: the verdict and the cost of
each part; the KL profile against the delta band with the chosen cut marked; what the host
would actually see (mosaics of projected feature maps at the input-side cuts, at the chosen cut
and one after); the FrontNet's cost per cut point; the method's definitions.

Figures are a list of `Figure`s and the cut table takes its extra columns from each cut's
`metrics` and `verdicts`, so further exposure methods (inversion attacks) add figures (e.g.
original/reconstruction pairs) and columns without a new layout.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infenclave.assess.scan import ScanResult

MOSAIC_TILES = 31  # channels shown per mosaic, lowest KL first (+ the photo = 4 rows of 8)
MOSAIC_IMAGES = 2  # photos with mosaics (each adds one figure per selected cut)
INPUT_SIDE_CUTS = 2  # mosaics for this many cut points from the input side
MOSAIC_COLS = 8
TILE = 96  # pixels per feature-map tile
GAP = 10  # pixels between tiles (room for the red frame)
LABEL = 14  # pixels above each tile for its label


@dataclass
class Figure:
    """One embedded image with its title and a caption that says how to read it."""

    id: str
    title: str
    caption: str
    png: bytes
    section: str = "exposure"  # which report section shows it
    alt: str = ""

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class ReportInputs:
    plan: dict[str, Any]
    result: ScanResult | None  # None: rendering from a plan alone (no mosaics)
    extra_figures: list[Figure] = field(default_factory=list)


def _png(fig: Any, *, tight: bool = True) -> bytes:
    """Render to PNG, then re-encode with a 256-colour palette: 3-4x smaller, and the report
    is one file that people mail around (the figures are plots and grey maps, not photos;
    the photo thumbnails survive a palette well at this size)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight" if tight else None)
    import matplotlib.pyplot as plt

    plt.close(fig)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _colours(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "viridis")
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _mark_cuts(ax: Any, plan: dict[str, Any], *, shade: bool = True) -> None:
    """Green line at the FrontNet end, purple dotted at the Tail start; grey where no KL."""
    rec = plan["recommendation"]
    idx = {c["name"]: c["index"] for c in plan["cuts"]}
    for c in plan["cuts"] if shade else []:
        if c["status"] in ("not-scanned", "not-assessable"):
            ax.axvspan(c["index"] - 0.5, c["index"] + 0.5, color="0.92", zorder=0, lw=0)
    if rec["front_end"] is not None:
        ax.axvline(idx[rec["front_end"]], color="#1a7f37", lw=2, zorder=1)
    ax.axvline(idx[rec["tail_start"]], color="#8250df", lw=1.5, ls=":", zorder=1)


def kl_profile_figure(plan: dict[str, Any]) -> Figure:
    """Per image: min KL per cut point against its delta, and the min KL / delta ratio."""
    plt = _plt()
    cuts = plan["cuts"]
    x = [c["index"] for c in cuts]
    names = [im["name"] for im in plan["images"]]
    colours = _colours(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), dpi=90, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    deltas = [im["delta"] for im in plan["images"]]
    ax1.axhspan(
        min(deltas), max(deltas), color="#f2cc60", alpha=0.35, lw=0, label="delta band: KL(p || uniform) of the images"
    )
    for k, name in enumerate(names):
        mins, meds, complete = [], [], []
        for c in cuts:
            r = c["images"][k] if c["images"] else None
            mins.append(np.nan if r is None or r["min_kl"] is None else r["min_kl"])
            meds.append(np.nan if r is None or r["median_kl"] is None else r["median_kl"])
            complete.append(bool(r and r["complete"]))
        mins_a, meds_a = np.asarray(mins, float), np.asarray(meds, float)
        ax1.plot(x, mins_a, "-", color=colours[k], lw=1.6, label=f"{name}: min over channels")
        ax1.plot(x, meds_a, "--", color=colours[k], lw=0.9, alpha=0.6)
        full = np.asarray(complete)
        ax1.plot(np.asarray(x)[full], mins_a[full], "o", color=colours[k], ms=5)
        ax1.plot(np.asarray(x)[~full], mins_a[~full], "o", mfc="white", mec=colours[k], ms=5)
        ax1.axhline(deltas[k], color=colours[k], lw=0.6, ls=(0, (1, 3)))
        ratio = mins_a / max(deltas[k], 1e-12)
        ax2.plot(x, ratio, "-o", color=colours[k], lw=1.4, ms=4)
    ax2.axhline(1.0, color="#cf222e", lw=1.5)
    ax2.text(x[0] - 0.4, 1.0, " safe above this line", va="bottom", ha="left", color="#cf222e", fontsize=9)
    for ax in (ax1, ax2):
        _mark_cuts(ax, plan)
        ax.set_yscale("log")
        ax.grid(True, which="major", axis="y", alpha=0.3)
    ax1.set_ylabel("KL(p || q_c), nats")
    ax1.set_title(
        "Exposure per cut point: solid = min over channels (open dot: upper bound, channels skipped), dashed = median",
        fontsize=10,
    )
    ax2.set_ylabel("min KL / delta")
    ax2.set_xticks(x)
    ax2.set_xticklabels([c["name"] for c in cuts], rotation=60, ha="right", fontsize=8)
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    caption = (
        "Top: for each image, the smallest KL(p || q_c) over the feature maps of each cut "
        "point (solid) and the median (dashed), against that image's delta (dotted line; "
        "the band spans all images' deltas). Bottom: the same minimum divided by delta; a "
        "cut point is safe for an image when its point lies above the red line. Green: the "
        "recommended FrontNet end; purple dotted: the Tail start; grey columns: not scanned "
        "or not assessable."
    )
    return Figure(
        "kl-profile", "KL profile per cut point", caption, _png(fig), alt="KL per cut point against the delta band"
    )


def mosaic_cuts(plan: dict[str, Any]) -> list[str]:
    """Cut points to show: the input-side ones, the recommended one and the one after it."""
    scanned = [c for c in plan["cuts"] if c["assessable"] and c["status"] != "not-scanned"]
    chosen = [c["name"] for c in scanned[:INPUT_SIDE_CUTS]]
    rec = plan["recommendation"]["front_end"]
    names = [c["name"] for c in plan["cuts"] if c["assessable"]]
    if rec is not None:
        chosen.append(rec)
        i = names.index(rec)
        if i + 1 < len(names):
            chosen.append(names[i + 1])
    elif scanned:
        chosen.append(scanned[-1]["name"])
    return list(dict.fromkeys(chosen))


def mosaic_figure(result: ScanResult, plan: dict[str, Any], cut_name: str, image: int) -> Figure:
    """The projected feature maps of one cut point for one image: what the host would see.

    Tiles are composed into one array and drawn with a single imshow (one matplotlib axes
    per tile made a report take half a minute).
    """
    from PIL import Image

    from infenclave.assess.kl import minmax_normalise, resize_bilinear

    plt = _plt()
    cut = next(c for c in plan["cuts"] if c["name"] == cut_name)
    cr = next(c for c in result.cuts if c.cut.name == cut_name)
    res = cr.images[image]  # type: ignore[index]
    photo = result.images[image]
    unit = minmax_normalise(result.irs[cut_name][image])  # (C, h, w) in [0, 1]
    computed = np.flatnonzero(~np.isnan(res.kl))
    order = [int(c) for c in computed[np.argsort(res.kl[computed], kind="stable")]]
    order += [c for c in range(unit.shape[0]) if c not in set(order)]
    shown = order[:MOSAIC_TILES]
    tiles = resize_bilinear(unit[shown], (TILE, TILE))  # (n, T, T) as the oracle sees them
    thumb = (
        np.asarray(Image.fromarray(photo.pixels).resize((TILE, TILE), Image.Resampling.BILINEAR), np.float32) / 255.0
    )
    cols, cell_w, cell_h = MOSAIC_COLS, TILE + GAP, TILE + LABEL + GAP
    rows = (len(shown) + 1 + cols - 1) // cols
    canvas = np.ones((rows * cell_h, cols * cell_w, 3), np.float32)  # white
    labels: list[tuple[int, int, str]] = []
    for k in range(len(shown) + 1):
        y0 = (k // cols) * cell_h + LABEL
        x0 = (k % cols) * cell_w + GAP // 2
        if k == 0:
            canvas[y0 : y0 + TILE, x0 : x0 + TILE] = thumb
            labels.append((x0, y0, "the photo"))
            continue
        ch = shown[k - 1]
        kl = res.kl[ch]
        if not np.isnan(kl) and kl <= res.delta:  # red frame: this map alone reveals
            canvas[y0 - 3 : y0 + TILE + 3, x0 - 3 : x0 + TILE + 3] = (0.81, 0.13, 0.18)
        canvas[y0 : y0 + TILE, x0 : x0 + TILE] = tiles[k - 1][..., None]
        labels.append((x0, y0, f"c{ch}  " + ("-" if np.isnan(kl) else f"KL {kl:.2f}")))
    height, width = canvas.shape[:2]
    head = 46  # pixels for the header text
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, (height + head) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + head)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for x0, y0, text in labels:
        ax.text(x0, y0 - 4, text, fontsize=7.5, va="bottom", ha="left")
    fig.text(
        0.005,
        1 - 4 / (height + head),
        f"{photo.name} at {cut_name} {tuple(cut['shape'])}: {cut['status']}, "
        f"delta {res.delta:.2f}; {res.evaluated}/{res.kl.size} channels computed\n"
        f"{len(shown)} maps shown, lowest KL first; red frame: KL <= delta "
        "(this map alone reveals the prediction)",
        fontsize=9,
        va="top",
        ha="left",
    )
    caption = (
        f"{photo.name}, cut point {cut_name}: each tile is one feature map, min-max "
        "normalised and resized as the oracle sees it, with its channel index and "
        "KL(p || q_c). Low KL means the oracle, shown this map alone, predicts nearly what "
        "the model predicts for the photo."
    )
    return Figure(
        f"mosaic-{cut_name}-{photo.name}",
        f"{cut_name} - {photo.name}",
        caption,
        _png(fig, tight=False),
        section="mosaics",
        alt=f"feature maps of {photo.name} at {cut_name}",
    )


def cost_figure(plan: dict[str, Any]) -> Figure:
    """FrontNet parameters, FLOPs and enclave memory, and the IR size, per cut point."""
    plt = _plt()
    cuts = plan["cuts"]
    x = [c["index"] for c in cuts]
    series = [
        ("FrontNet weights (MB)", [c["frontnet_cost"]["param_bytes"] / 1e6 for c in cuts]),
        ("FrontNet compute (GFLOPs per image)", [c["frontnet_cost"]["flops"] / 1e9 for c in cuts]),
        (
            "FrontNet enclave memory (MB): weights + peak activations",
            [c["frontnet_cost"]["memory_bytes"] / 1e6 for c in cuts],
        ),
        ("IR1 size per image (KB): what the host receives", [c["ir_bytes"] / 1e3 for c in cuts]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), dpi=90, sharex=True)
    for ax, (title, ys) in zip(axes.ravel(), series):
        ax.plot(x, ys, "-o", color="#0969da", ms=3.5)
        _mark_cuts(ax, plan, shade=False)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xticks(x)
        ax.set_xticklabels([c["name"] for c in cuts], rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    caption = (
        "Cost of a FrontNet that ends at each cut point (batch 1, float32). The green line "
        "marks the recommended FrontNet end, purple dotted the Tail start."
    )
    return Figure(
        "cost", "FrontNet cost per cut point", caption, _png(fig), section="cost", alt="FrontNet cost per cut point"
    )


def build_figures(plan: dict[str, Any], result: ScanResult | None) -> list[Figure]:
    figs = [kl_profile_figure(plan), cost_figure(plan)]
    if result is not None:
        for cut_name in mosaic_cuts(plan):
            for i in range(min(MOSAIC_IMAGES, len(result.images))):
                figs.append(mosaic_figure(result, plan, cut_name, i))
    return figs


def _human_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _human_flops(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f} G"
    return f"{n / 1e6:.1f} M"


def _kl(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def render_report(inputs: ReportInputs) -> str:
    """The report as one HTML string."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("infenclave.assess", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,  # a missing value is a bug, not a blank cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(bytes=_human_bytes, flops=_human_flops, kl=_kl)
    plan = inputs.plan
    figures = build_figures(plan, inputs.result) + inputs.extra_figures
    # per-cut metrics that are whole attack records go into the attack table, not a cell
    metric_keys = sorted({k for c in plan["cuts"] for k, v in c["metrics"].items() if not isinstance(v, (dict, list))})
    verdict_keys = sorted({k for c in plan["cuts"] for k in c["verdicts"]})
    results = plan.get("adversary", {}).get("results") or {}
    attack_rows = sorted(results.get("cuts", []), key=lambda r: (r["cut_index"], r["attack"]))
    return env.get_template("report.html.j2").render(
        plan=plan,
        figures=figures,
        metric_keys=metric_keys,
        verdict_keys=verdict_keys,
        cut_index={c["name"]: c for c in plan["cuts"]},
        attack_rows=attack_rows,
        budget_label=_budget_label(results.get("budgets")),
        split_cost=_split_cost(plan),
    )


def _split_cost(plan: dict[str, Any]) -> dict[str, Any] | None:
    """When the plan keeps the whole model in the enclave: the enclave FLOPs of the split at
    the KL method's first safe cut (FrontNet up to it, Tail from the plan's Tail start), to set
    the whole model's cost against; None when there is no such split to compare with."""
    whole = (plan.get("enclave") or {}).get("cost")
    first_safe = plan["verdicts"].get("kl_oracle", {}).get("first_safe_cut")
    cuts = {c["name"]: c for c in plan["cuts"]}
    tail_start = plan["recommendation"]["tail_start"]
    if plan["partition"] is not None or not whole or first_safe not in cuts or tail_start not in cuts:
        return None
    front, tail_from = cuts[first_safe], cuts[tail_start]
    if front["index"] >= tail_from["index"]:
        return None
    # Cut points separate the graph: the Tail is the whole model less everything before it.
    flops = front["frontnet_cost"]["flops"] + whole["flops"] - tail_from["frontnet_cost"]["flops"]
    return {
        "front_end": first_safe,
        "tail_start": tail_start,
        "flops": flops,
        "share": flops / max(1, whole["flops"]),
        "ratio": whole["flops"] / max(1, flops),
    }


def _budget_label(b: dict[str, Any] | None) -> str:
    """The attack budgets in words, from the plan (the report renders from the plan alone)."""
    if not b:
        return "-"
    return (
        f"white-box: up to {b['whitebox_steps']} Adam steps per restart (stops earlier on a "
        f"loss plateau) x {b.get('whitebox_restarts', 1)} restart(s) "
        f"({', '.join(b.get('whitebox_formulations', ['relative-mse']))}); "
        f"decoder: {b['decoder_epochs']} epochs"
    )
