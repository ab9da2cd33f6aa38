"""The report's charts: matplotlib figures as inline SVG text (no server, no script, no network).

SVG ids are salted with a constant and the date is left out, so the same numbers draw the same bytes;
text stays text (``svg.fonttype: none``), which keeps a chart small and its labels searchable.
"""

from __future__ import annotations

import io
import math
import re

RC = {"svg.fonttype": "none", "svg.hashsalt": "bench-report", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}
COLORS = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]  # the first run (the base) in grey


def _svg(fig) -> str:
    """The figure as an ``<svg>`` element for an HTML page: the XML prolog, doctype, RDF metadata and
    namespace declarations dropped (HTML's parser puts inline SVG and ``xlink:href`` in their namespaces),
    so the page names no URL at all."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg"):], flags=re.S)
    return re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)


def _rc(title: str) -> dict:
    """The style, with the ids salted by the chart's title: charts inlined in one page keep apart ids."""
    return RC | {"svg.hashsalt": f"bench-report/{title}"}


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def interval_chart(title: str, labels: list[str], series: dict[str, list[tuple]], xlabel: str) -> str:
    """Means with their intervals: one row per label, one marker per series (a run) with its interval as a
    horizontal bar, ``(mean, lo, hi)`` each; a missing value is left out. Markers, not bars from zero, so
    differences of a fraction of the mean stay visible."""
    import matplotlib
    from matplotlib.figure import Figure

    n, k = len(labels), max(1, len(series))
    offset = 0.6 / k
    with matplotlib.rc_context(_rc(title)):
        fig = Figure(figsize=(4.4, 0.75 + 0.22 * n * k + 0.25 * (k > 1)))
        ax = fig.subplots()
        for j, (name, values) in enumerate(series.items()):
            ys, xs, err = [], [], [[], []]
            for i, value in enumerate(values):
                mean, lo, hi = value if value is not None else (None, None, None)
                if not _finite(mean):
                    continue
                ys.append(i + (j - (k - 1) / 2) * offset)
                xs.append(mean)
                err[0].append(mean - lo if _finite(lo) else 0.0)
                err[1].append(hi - mean if _finite(hi) else 0.0)
            ax.errorbar(xs, ys, xerr=err, fmt="o", color=COLORS[j % len(COLORS)], markersize=4, capsize=2, linewidth=1.2, label=_text(name))
        ax.set_yticks(range(n), labels=[_short(label) for label in labels])
        ax.set_ylim(n - 0.5, -0.5)
        ax.grid(axis="x", linewidth=0.3)
        ax.set_title(_text(title), loc="left")
        ax.set_xlabel(_text(xlabel))
        if k > 1:
            ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
        return _svg(fig)


def curves(title: str, rows: list[dict], keys: list[str]) -> str:
    """One panel per key of the training log against the optimizer step (a thin raw line, and over 50
    steps its moving average over a twentieth of the run on top)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context(_rc(title)):
        fig = Figure(figsize=(6.4, 1.5 * len(keys) + 0.6))
        axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            points = [(r["step"], r[key]) for r in rows if _finite(r.get(key))]
            steps, values = [p[0] for p in points], [p[1] for p in points]
            ax.plot(steps, values, linewidth=0.7, color=COLORS[1], alpha=0.6 if len(values) > 50 else 1.0)
            if len(values) > 50:
                width = max(2, len(values) // 20)
                smooth = [sum(values[max(0, i - width + 1): i + 1]) / len(values[max(0, i - width + 1): i + 1]) for i in range(len(values))]
                ax.plot(steps, smooth, linewidth=1.4, color=COLORS[2])
            ax.set_ylabel(_text(key.replace("_", " ")))
        axes[-1, 0].set_xlabel("optimizer step")
        axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0, 0].set_title(_text(title), loc="left")
        return _svg(fig)


def checkpoint_chart(title: str, steps: list[int], series: dict[str, list[tuple | None]]) -> str:
    """Each metric's paired difference from the base model at every kept checkpoint, one panel per metric
    side by side: ``(delta, lo, hi)`` per step, a line through the points, the interval as an error bar,
    and zero marked. The proxy reward beside the truth it stands in for shows over-optimization."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context(_rc(title)):
        fig = Figure(figsize=(2.3 * len(series) + 0.4, 2.4), layout="constrained")
        axes = fig.subplots(1, len(series), squeeze=False)[0]
        for j, (ax, (name, values)) in enumerate(zip(axes, series.items())):
            points = [(s, v) for s, v in zip(steps, values) if v is not None and _finite(v[0])]
            xs, ys = [p[0] for p in points], [p[1][0] for p in points]
            err = [[y - (v[1] if _finite(v[1]) else y) for y, (_, v) in zip(ys, points)], [(v[2] if _finite(v[2]) else y) - y for y, (_, v) in zip(ys, points)]]
            ax.axhline(0, color=COLORS[0], linewidth=0.6)
            ax.errorbar(xs, ys, yerr=err, fmt="o-", color=COLORS[1 + j % (len(COLORS) - 1)], markersize=3, capsize=2, linewidth=1.2)
            ax.set_title(_text(f"Δ {name}"), loc="left")
            ax.set_xlabel("optimizer step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
            ax.grid(axis="y", linewidth=0.3)
        fig.suptitle(_text(title), x=0.01, ha="left")
        return _svg(fig)


def _text(text: str) -> str:
    """A user string as plain text for matplotlib, which reads ``$...$`` as mathtext."""
    return str(text).replace("$", r"\$")


def _short(label: str, width: int = 40) -> str:
    """A long group label cut to ``width`` characters (the full label is in the tables), as plain text."""
    return _text(label if len(label) <= width else label[: width - 1] + "…")
