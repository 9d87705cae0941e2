"""The report's figures (seaborn on the Agg backend), each written as PNG and SVG.

Every method has one colour in every figure (registry order of the colour-blind
palette).  Each ``*_figure`` function returns a matplotlib figure, or ``None`` when
the store has nothing to draw; :func:`save` writes it and closes it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.lines
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from kdbench.report.load import ReportData  # noqa: E402
from kdbench.report.tables import PAPER_BEST_ACCURACY, PAPER_LABEL, swept  # noqa: E402

WIDTH = 7.0  # inches: the text width of an A4 page
DPI = 200
ACCURACY_LABEL = "Test accuracy (%)"
STYLE = {"svg.hashsalt": "kdbench-report", "font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8}


def save(fig: plt.Figure, folder: Path, stem: str) -> None:
    """Write ``folder/stem.png`` and ``folder/stem.svg`` without timestamps, then close the figure."""
    folder.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):  # svg.hashsalt: stable element ids
        fig.savefig(folder / f"{stem}.png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(folder / f"{stem}.svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)


def labels(data: ReportData) -> list[str]:
    """The ablation's method labels in rank order (the hue order of every figure)."""
    return [data.label(m) for m in data.methods]


def palette(data: ReportData) -> dict[str, str]:
    """A colour per method label: the colour-blind palette in the order of the methods' ranks."""
    ranked = sorted({(p.rank, p.label) for p in data.plans.values()} | {(g.rank, g.label) for g in _grid_points(data)})
    colours = sns.color_palette("colorblind", max(len(ranked), 1))
    return {label: colours[i] for i, (_, label) in enumerate(ranked)}


def _grid_points(data: ReportData) -> list:
    return [g for p in data.plans.values() for g in p.grid_points]


def _default_done(data: ReportData) -> pd.DataFrame:
    done = data.done
    return done[done["default"]]


def _legend_below(fig: plt.Figure, handles, names, ncol: int = 3) -> None:
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False)


def _facets(data: ReportData, height: float = 2.6, rows: int = 1, **kw) -> tuple[plt.Figure, np.ndarray]:
    """A grid of axes, ``rows`` high, one column per dataset."""
    return plt.subplots(rows, len(data.datasets), figsize=(WIDTH, height * rows), squeeze=False, **kw)


def plain(text: str) -> str:
    """``text`` shown as is by matplotlib: a ``$`` in a dataset or class name must not start math mode."""
    return str(text).replace("$", r"\$")


def _empty(ax: plt.Axes, title: str) -> None:
    """Mark a panel that has no finished trial."""
    ax.set_axis_off()
    ax.set_title(plain(f"{title}: no finished trial"))


def accuracy_figure(data: ReportData) -> plt.Figure | None:
    """Bars of mean test accuracy per method and dataset, ±1 std across seeds, seeds as dots (no random jitter), paper line."""
    trials = _default_done(data)
    if trials.empty:
        return None
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 3.4))
        order, hue = [plain(d) for d in data.datasets], labels(data)
        common = {
            "data": trials.assign(dataset=trials["dataset"].map(plain)),
            "x": "dataset",
            "y": "best_acc",
            "hue": "label",
            "order": order,
            "hue_order": hue,
            "ax": ax,
        }
        sns.barplot(**common, palette=palette(data), errorbar="sd", capsize=0.15, err_kws={"linewidth": 1})
        sns.stripplot(**common, dodge=True, palette=dict.fromkeys(hue, "black"), size=3, jitter=False, legend=False)
        ax.axhline(
            PAPER_BEST_ACCURACY,
            color="0.3",
            linestyle="--",
            linewidth=1,
            label=f"{PAPER_LABEL}: {PAPER_BEST_ACCURACY:.2f}%",
        )
        ax.set(xlabel="Dataset", ylabel=ACCURACY_LABEL, ylim=(0, 105))
        handles, names = ax.get_legend_handles_labels()
        ax.get_legend().remove()
        _legend_below(fig, handles, names)
        fig.tight_layout()
    return fig


def temperature_figure(data: ReportData) -> plt.Figure | None:
    """Accuracy against T per dataset (mean, ±1 std band), teacher and baseline as dashed lines."""
    trials = swept(data, ("temperature",))
    trials = trials[trials["status"] == "done"]
    if trials.empty:
        return None
    references = _default_done(data)
    references = references[references["method"].map(lambda m: "temperature" not in data.sweep_axes(m))]
    with plt.rc_context(STYLE):
        fig, axes = _facets(data, sharey=True)
        for ax, dataset in zip(axes[0], data.datasets):
            subset = trials[trials["dataset"] == dataset]
            if subset.empty:
                _empty(ax, dataset)
                continue
            sns.lineplot(
                data=subset,
                x="temperature",
                y="best_acc",
                hue="label",
                palette=palette(data),
                hue_order=labels(data),
                errorbar="sd",
                marker="o",
                ax=ax,
                legend=False,
            )
            for label, group in references[references["dataset"] == dataset].groupby("label"):
                ax.axhline(group["best_acc"].mean(), color=palette(data)[label], linestyle="--", linewidth=1)
            ax.set(
                title=plain(dataset),
                xlabel="Temperature T",
                ylabel=ACCURACY_LABEL,
                xticks=sorted(trials["temperature"].unique()),
            )
        _method_legend(fig, data)
        fig.tight_layout()
    return fig


def _method_legend(fig: plt.Figure, data: ReportData) -> None:
    """One legend entry per method: its colour, a square for the teacher and a circle for students."""
    markers = {p.label: "s" if p.role == "teacher" else "o" for p in data.plans.values()}
    colours = palette(data)
    handles = [plt.Line2D([], [], color=colours[name], marker=markers[name]) for name in labels(data)]
    _legend_below(fig, handles, labels(data))


def _log_axis(ax: plt.Axes) -> None:
    """A log x axis labelled at 1, 2 and 5 times powers of ten, as plain numbers."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def weights_figure(data: ReportData) -> plt.Figure | None:
    """Heatmaps of mean accuracy over (KL weight β, cosine weight γ) for methods that use both, one per dataset."""
    trials = swept(data, ("beta", "gamma"))
    varied = trials.groupby("method")[["beta", "gamma"]].nunique().max(axis=1) if len(trials) else pd.Series(dtype=int)
    methods = [m for m in data.methods if {"beta", "gamma"} <= set(data.sweep_axes(m)) and varied.get(m, 0) > 1]
    trials = trials[(trials["status"] == "done") & trials["method"].isin(methods)]
    if trials.empty:
        return None
    with plt.rc_context(STYLE):
        fig, axes = _facets(data, height=2.8, rows=len(methods))
        for row, method in zip(axes, methods):
            for ax, dataset in zip(row, data.datasets):
                subset = trials[(trials["method"] == method) & (trials["dataset"] == dataset)]
                grid = subset.pivot_table(index="beta", columns="gamma", values="best_acc", aggfunc="mean")
                if grid.empty:
                    _empty(ax, f"{data.label(method)}, {dataset}")
                    continue
                sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": ACCURACY_LABEL})
                ax.set(title=plain(f"{data.label(method)}, {dataset}"), xlabel="Cosine weight γ", ylabel="KL weight β")
        fig.tight_layout()
    return fig


def curves_figure(data: ReportData) -> plt.Figure | None:
    """Validation accuracy per epoch of the teacher and every student (default trials; mean, ±1 std band)."""
    rows = [
        {"dataset": t.dataset, "label": t.label, "seed": t.seed, "epoch": h["epoch"], "val": 100 * h["val_accuracy"]}
        for t in _default_done(data).itertuples()
        for h in t.result.history
    ]
    if not rows:
        return None
    curves = pd.DataFrame(rows)
    with plt.rc_context(STYLE):
        fig, axes = _facets(data, sharey=True)
        for ax, dataset in zip(axes[0], data.datasets):
            subset = curves[curves["dataset"] == dataset]
            if subset.empty:
                _empty(ax, dataset)
                continue
            sns.lineplot(
                data=subset,
                x="epoch",
                y="val",
                hue="label",
                hue_order=labels(data),
                palette=palette(data),
                errorbar="sd",
                ax=ax,
                legend=False,
            )
            ax.set(title=plain(dataset), xlabel="Epoch", ylabel="Validation accuracy (%)")
            ax.xaxis.get_major_locator().set_params(integer=True)
        _method_legend(fig, data)
        fig.tight_layout()
    return fig


def confusion_figure(data: ReportData, dataset: str, method: str) -> plt.Figure:
    """Row-normalised test confusion matrix of ``method``'s default trials on ``dataset``, summed over their seeds."""
    trials = _default_done(data)
    trials = trials[(trials["dataset"] == dataset) & (trials["method"] == method)]
    classes = [plain(c) for c in trials["result"].iloc[0].classes]
    counts = sum(np.array(r.best.test.confusion_matrix) for r in trials["result"])
    share = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    cells = np.where(share >= 0.5, np.round(share).astype(int).astype(str), "")  # empty cells stay blank
    size = min(WIDTH, 2.0 + 0.32 * len(classes))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(size + 1.0, size))
        sns.heatmap(
            pd.DataFrame(share, index=classes, columns=classes),
            annot=cells,
            fmt="",
            cmap="Blues",
            vmin=0,
            vmax=100,
            square=True,
            ax=ax,
            annot_kws={"fontsize": 6 if len(classes) <= 12 else 5},
            cbar_kws={"label": "Share of the true class (%)"},
        )
        ax.set(
            xlabel="Predicted class",
            ylabel="True class",
            title=plain(f"{data.label(method)} on {dataset}\nbest-val ckpt, {len(trials)} seed(s) summed"),
        )
        ax.tick_params(axis="x", labelrotation=90)
        ax.tick_params(axis="y", labelrotation=0)
        fig.tight_layout()
    return fig


def cost_figure(data: ReportData, latency: dict[str, float], int8_latency: dict[str, float] | None = None) -> plt.Figure | None:
    """Mean test accuracy (±1 std) against GFLOPs per image and, given ``latency`` (model -> ms), against latency.

    Students share one architecture, so their points are spread slightly sideways to stay legible.  Quantized trials
    (Table 2c) add hollow INT8 points: at the same GFLOPs, and at ``int8_latency`` (model -> ms, ONNX Runtime INT8).
    """
    points = _cost_points(data)
    if points.empty:
        return None
    axes_x = [("gflops", "GFLOPs per image (log scale)")]
    points["int8_gflops"] = points["gflops"]
    if latency:
        points["latency"] = points["model"].map(latency)
        points["int8_latency"] = points["model"].map(int8_latency or {})
        axes_x.append(("latency", "CPU latency, batch 1 (ms, log scale)"))
    with plt.rc_context(STYLE):
        fig, axes = _facets(data, height=2.5, rows=len(axes_x), sharey="col")
        for row, (column, xlabel) in zip(axes, axes_x):
            for ax, dataset in zip(row, data.datasets):
                subset = points[(points["dataset"] == dataset) & points[column].notna()]
                if subset.empty:
                    _empty(ax, dataset)
                    continue
                for p in subset.itertuples():
                    style = dict(fmt="o" if p.role == "student" else "s", color=palette(data)[p.label], capsize=2, markersize=5)
                    x = getattr(p, column) * 1.06**p.offset
                    ax.errorbar(x, p.mean, yerr=0 if np.isnan(p.std) else p.std, **style)
                    x8 = getattr(p, f"int8_{column}")
                    if not np.isnan(p.int8_mean) and not np.isnan(x8):  # the same model quantized to INT8: hollow
                        y8err = 0 if np.isnan(p.int8_std) else p.int8_std
                        ax.errorbar(x8 * 1.06**p.offset, p.int8_mean, yerr=y8err, markerfacecolor="white", **style)
                _log_axis(ax)
                ax.set(title=plain(dataset), xlabel=xlabel, ylabel=ACCURACY_LABEL)
        _method_legend(fig, data)
        fig.tight_layout()
    return fig


def _cost_points(data: ReportData) -> pd.DataFrame:
    """Per dataset and method: mean and std of accuracy, the model and its GFLOPs, and a sideways offset."""
    trials = _default_done(data)
    trials = trials[trials["complexity"].notna()]
    rows = []
    for (dataset, method), group in trials.groupby(["dataset", "method"], sort=False):
        info = group["complexity"].iloc[0]
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "label": data.label(method),
                "role": data.plan(method).role,
                "model": info["model"],
                "gflops": info["flops"] / 1e9,
                "mean": group["best_acc"].mean(),
                "std": group["best_acc"].std(),
                "int8_mean": group["int8_acc"].mean(),  # NaN without INT8 results
                "int8_std": group["int8_acc"].std(),
            }
        )
    points = pd.DataFrame(rows)
    if not points.empty:
        rank = points.groupby(["dataset", "model"]).cumcount()
        points["offset"] = rank - points.groupby(["dataset", "model"])["method"].transform("count").sub(1) / 2
    return points


def forest_figure(accuracy: pd.DataFrame, claim: pd.DataFrame | None, across: pd.DataFrame | None) -> plt.Figure | None:
    """Every difference with its interval, per dataset and pooled, zero marked: each student against the baseline
    (left) and the paper's method against each other student (right); filled markers where the verdict is a gain
    or a loss.  From the CSV frames of Tables 1, 1b and 1c."""
    panels = [("against the baseline", _forest_rows(accuracy[accuracy["role"] == "student"], across, "diff"))]
    if claim is not None and len(claim):
        panels.append(("the paper's method against each", _forest_rows(claim, across, "claim")))
    panels = [(title, rows) for title, rows in panels if len(rows)]
    if not panels:
        return None
    height = 0.9 + 0.22 * max(len(rows) for _, rows in panels)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(WIDTH, height), squeeze=False)
        for ax, (title, rows) in zip(axes[0], panels):
            y = np.arange(len(rows))[::-1]
            judged = rows["verdict"].isin(["gain", "loss"]).to_numpy()
            for filled in (True, False):
                pick = judged == filled
                ax.errorbar(
                    rows["mean"][pick],
                    y[pick],
                    xerr=[(rows["mean"] - rows["low"])[pick], (rows["high"] - rows["mean"])[pick]],
                    fmt="o",
                    color="0.15",
                    markerfacecolor="0.15" if filled else "white",
                    markersize=4,
                    capsize=2,
                    linewidth=1,
                )
            ax.axvline(0, color="0.4", linewidth=0.8, linestyle="--")
            ax.set_yticks(y, [plain(t) for t in rows["name"]])
            ax.set(xlabel="Δ test accuracy, pp", title=title)
            for tick, pooled in zip(ax.get_yticklabels(), rows["pooled"]):
                tick.set_fontweight("bold" if pooled else "normal")
        fig.tight_layout()
    return fig


def _forest_rows(per_dataset: pd.DataFrame, across: pd.DataFrame | None, prefix: str) -> pd.DataFrame:
    """name, mean, low, high, verdict, pooled: one row per dataset and comparison with an interval, then the pooled ones."""
    done = per_dataset[per_dataset["diff_low"].notna()]
    rows = [
        {
            "name": f"{r.dataset}: {r.label}",
            "mean": r.diff_mean,
            "low": r.diff_low,
            "high": r.diff_high,
            "verdict": r.verdict,
            "pooled": False,
        }
        for r in done.itertuples()
    ]
    if across is not None:
        verdict_column = "verdict" if prefix == "diff" else f"{prefix}_verdict"
        pooled = across[across[f"{prefix}_low"].notna()] if f"{prefix}_low" in across else across.iloc[0:0]
        rows += [
            {
                "name": f"pooled: {r['label']}",
                "mean": r[f"{prefix}_mean"],
                "low": r[f"{prefix}_low"],
                "high": r[f"{prefix}_high"],
                "verdict": r[verdict_column],
                "pooled": True,
            }
            for _, r in pooled.iterrows()
        ]
    return pd.DataFrame(rows, columns=["name", "mean", "low", "high", "verdict", "pooled"])


def critical_difference_figure(data: ReportData) -> plt.Figure | None:
    """The critical-difference diagram of the students' mean ranks over (dataset, seed) blocks (scikit-posthocs,
    Nemenyi post-hoc tests after Friedman; Demšar, JMLR 2006); None where Friedman is not defined."""
    import scikit_posthocs

    from kdbench.report.across import nemenyi, student_ranks

    students = [m for m in data.methods if data.plan(m).role == "student"]
    if len(data.datasets) < 2:
        return None
    ranks = student_ranks(_default_done(data), students)
    p_values = nemenyi(ranks)
    if p_values is None:
        return None
    names = {m: plain(data.label(m)) for m in ranks.columns}
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.6 + 0.25 * len(names)))
        drawn = scikit_posthocs.critical_difference_diagram(
            ranks.mean().rename(names), p_values.rename(index=names, columns=names), ax=ax
        )
        for line in (line for bar in drawn["crossbars"] for line in bar):
            _sort_points(line)
        fig.tight_layout()
    return fig


def _sort_points(line: matplotlib.lines.Line2D) -> None:
    """Order a horizontal line's points from left to right.

    scikit-posthocs draws each crossbar through a set of labels, in an order that changes with Python's
    string hashing from one process to the next; sorted, the figure's bytes do not.
    """
    x, y = line.get_data()
    order = np.argsort(np.asarray(x), kind="stable")
    line.set_data(np.asarray(x)[order], np.asarray(y)[order])
