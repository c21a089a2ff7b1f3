"""Plots of the benchmarks' JSON reports (`bench throughput|serve|eval --plot FILE`, `bench plot REPORT.json`).

One function per benchmark, each taking the report dict (serve: one report or several, one per
concurrency) and returning a matplotlib Figure; `render()` turns a figure into PNG bytes, which the
command line writes by the output-file rule of diffutron_engine.outputs. `plot_report()` detects what a
saved report is and draws it. Torch-free, and matplotlib (optional: the `plot` extra) is imported only
inside the functions, with the Agg backend; `require_matplotlib()` is the check a command makes before
it measures anything.
"""

from __future__ import annotations

import importlib
import io

from ..errors import DiffutronError

INSTALL = "pip install -e '.[plot]' (or pip install matplotlib)"
DPI = 100
KINDS = ("throughput", "serve", "eval")


def require_matplotlib(what: str = "--plot") -> None:
    """One DiffutronError naming the install when matplotlib is missing (before any measuring)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise DiffutronError(f"{what} needs matplotlib, which is not installed: {INSTALL}") from None


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    plt = _pyplot()
    out = io.BytesIO()
    try:
        fig.savefig(out, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return out.getvalue()


# ------------------------------------------------------------------------------------------ shared
def machine_label(machine: dict | None) -> str:
    """The machine record in a few words: the GPU (CUDA runs) or the CPU and its threads, and torch."""
    if not machine:
        return "machine not recorded"
    parts = []
    if machine.get("gpu"):
        parts.append(str(machine["gpu"]))
    elif machine.get("cpu"):
        threads = machine.get("cpu_threads")
        parts.append(f"{machine['cpu']}" + (f", {threads} threads" if threads else ""))
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return "; ".join(parts) or "machine not recorded"


def _bar_labels(ax, bars, texts, fontsize=8) -> None:
    for bar, text in zip(bars, texts):
        if text:
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=fontsize)


def _finish(fig, title: str, subtitle: str, machine: dict | None) -> None:
    """Three lines above the panels: what ran, its settings, the machine."""
    fig.suptitle(f"{title}\n{subtitle}\n{machine_label(machine)}", fontsize=9)
    fig.tight_layout()


def _num(value) -> float:
    """A figure to draw: None (not measured) as 0."""
    return 0.0 if value is None else float(value)


# ------------------------------------------------------------------------------------------ throughput
def plot_throughput(report: dict):
    """Tokens/s, agreement with the oracle (%) and forward passes per token of each mode."""
    plt = _pyplot()
    cfg, modes = report.get("config", {}), report["modes"]
    names = list(modes)
    ref = modes.get("reference")
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.9), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    x = range(len(names))

    ax = axes[0]
    speed = [_num(modes[n]["tokens_per_s"]) for n in names]
    bars = ax.bar(x, speed, color="tab:blue")
    ratios = [f"{s / ref['tokens_per_s']:.2f}x" if ref and ref.get("tokens_per_s") else "" for s in speed]
    _bar_labels(ax, bars, ratios)
    ax.set_ylabel("generated tokens/s")
    ax.set_title("throughput (label: x oracle)", fontsize=9)
    ax.margins(y=0.15)

    ax = axes[1]
    agree = [modes[n].get("agreement") for n in names]
    bars = ax.bar(x, [_num(a) for a in agree], color="tab:green")
    _bar_labels(ax, bars, ["n/a" if a is None else f"{a:.1f}" for a in agree])
    ax.set_ylabel("tokens equal to the oracle's (%)")
    ax.set_ylim(0, 112)
    ax.set_title("agreement with the oracle", fontsize=9)

    ax = axes[2]
    fwd = [_num(modes[n].get("forwards_per_token")) for n in names]
    bars = ax.bar(x, fwd, color="tab:orange")
    _bar_labels(ax, bars, [f"{f:.2f}" for f in fwd])
    ax.set_ylabel("forward passes per generated token")
    ax.set_title("forward passes", fontsize=9)
    ax.margins(y=0.15)

    for ax in axes:
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    sampling = "greedy" if not cfg.get("temperature") else f"temperature {cfg['temperature']:g}"
    vocab = f", vocab {cfg['vocab_size']:,}" if cfg.get("vocab_size") else ""
    graphs = ", CUDA graphs" if cfg.get("cuda_graphs") else ""
    title = (f"bench throughput: mmBERT-base, {cfg.get('layers', '?')} layers, random weights{vocab}; "
             f"{cfg.get('dtype', '?')} on {cfg.get('device', '?')}{graphs}")
    subtitle = (f"batch {cfg.get('batch_size', '?')}, prompt {cfg.get('prompt_len', '?')}, "
                f"{cfg.get('new_tokens', '?')} new tokens, {cfg.get('steps', '?')} steps, "
                f"block {cfg.get('block_size', '?')}, {sampling}")
    _finish(fig, title, subtitle, report.get("machine"))
    return fig


# ------------------------------------------------------------------------------------------ serve
def _serve_label(report: dict) -> str:
    rate = report.get("request_rate")
    label = f"{report.get('concurrency', '?')}"
    if rate:
        label += f"\n@{rate:g} req/s"
    return label + f"\n{report.get('output_tokens_per_s', 0):.0f} tok/s"


def plot_serve(reports):
    """Latency and time-to-first-chunk percentiles (p50, p90, p99) per concurrency; one report (one
    concurrency, as one `bench serve` run measures) or several, ordered by concurrency."""
    plt = _pyplot()
    if isinstance(reports, dict):
        reports = [reports]
    if not reports:
        raise DiffutronError("no serve report to plot")
    reports = sorted(reports, key=lambda r: (r.get("concurrency") or 0, r.get("request_rate") or 0))
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.1))
    width = 0.26
    x = list(range(len(reports)))
    colors = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red"}
    for ax, key, what in ((axes[0], "latency_s", "end-to-end latency"), (axes[1], "ttfc_s", "time to first chunk")):
        for j, q in enumerate(("p50", "p90", "p99")):
            values = [(r.get(key) or {}).get(q) for r in reports]
            ax.bar([i + (j - 1) * width for i in x], [_num(v) for v in values], width, label=q, color=colors[q])
        ax.set_xticks(x, [_serve_label(r) for r in reports], fontsize=8)
        ax.set_xlim(-0.75, len(reports) - 0.25)  # one concurrency: bars of the same width as for several
        ax.margins(y=0.25)  # room for the legend above the bars
        ax.set_xlabel("concurrent requests (and output tokens/s)", fontsize=9)
        ax.set_ylabel(f"{what} (s)")
        ax.set_title(what, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", ncols=3)
    first = reports[0]
    args = first.get("args") or {}
    models = sorted({str(r.get("model")) for r in reports if r.get("model")})
    model = ", ".join(models) if models else "model not recorded"
    errors = sum(r.get("errors", 0) for r in reports)
    requests = sorted({r.get("requests") for r in reports if r.get("requests") is not None})
    knobs = f"; {args['extra_body']}" if args.get("extra_body") else ""
    title = f"bench serve: {model}, max_tokens {args.get('max_tokens', '?')}{knobs}"
    subtitle = f"{'/'.join(str(n) for n in requests) or '?'} requests per run, {errors} failed"
    _finish(fig, title, subtitle, first.get("machine"))
    return fig


# ------------------------------------------------------------------------------------------ eval
def plot_eval(report: dict):
    """lm-eval's work, plain vs the engine's way: the likelihood's requests/s (with the speed-up) and peak
    memory, and generate_until's requests/s, one request at a time vs the engine's batch (with the
    speed-up); a report holds either phase or both (reports from before the generation phase: the
    likelihood alone)."""
    plt = _pyplot()
    cfg, rows = report.get("config", {}), report.get("results") or []
    gen = report.get("generation")
    if not rows and not gen:
        raise ValueError("the report holds neither phase")
    panels = (2 if rows else 0) + (1 if gen else 0)
    width = {1: 6.0, 2: 8.5, 3: 11.5}[panels]
    fig, axes = plt.subplots(1, panels, figsize=(width, 3.9), squeeze=False)
    axes = list(axes[0])
    lines = []

    if rows:
        names = [r["name"] for r in rows]
        colors = ["tab:gray", "tab:blue"] + ["tab:green"] * max(len(rows) - 2, 0)
        ax = axes.pop(0)
        bars = ax.bar(names, [_num(r["requests_per_s"]) for r in rows], color=colors[:len(rows)])
        base = rows[0].get("seconds")  # the report's speed-up: the ratio of the times
        _bar_labels(ax, bars, [f"{base / r['seconds']:.2f}x" if base and r.get("seconds") else "" for r in rows])
        ax.set_ylabel("scored requests/s")
        ax.set_title("likelihood: speed (label: x plain)", fontsize=9)
        ax.margins(y=0.15)

        ax = axes.pop(0)
        peaks = [r.get("peak_mem_mb") for r in rows]
        bars = ax.bar(names, [_num(p) for p in peaks], color=colors[:len(rows)])
        _bar_labels(ax, bars, ["n/a" if p is None else f"{p:,.0f}" for p in peaks])
        ax.set_ylabel("peak working memory (MiB)")
        ax.set_title("likelihood: memory above the weights", fontsize=9)
        ax.margins(y=0.15)
        lines.append(f"likelihood: {cfg.get('requests', '?')} requests, mc_num {cfg.get('mc_num', '?')}, batch "
                     f"{cfg.get('batch_size', '?')}, token budget {cfg.get('token_budget', '?')}; largest "
                     f"difference {report.get('max_abs_diff', float('nan')):.2g}")

    if gen:
        gcfg, grows = gen.get("config", {}), gen["results"]
        ax = axes.pop(0)
        labels = [f"{r['name']}\n{'one at a time' if r['name'] == 'plain' else 'batched'}" for r in grows]
        bars = ax.bar(labels, [_num(r["requests_per_s"]) for r in grows],
                      color=["tab:gray", "tab:purple"][:len(grows)])
        base = grows[0].get("requests_per_s") if grows else None
        ratios = [r["requests_per_s"] / base if base and r.get("requests_per_s") else None for r in grows]
        if len(grows) == 2 and gen.get("speedup"):  # the report's, from the unrounded times
            ratios[1] = gen["speedup"]
        _bar_labels(ax, bars, ["" if x is None else f"{x:.2f}x" for x in ratios])
        ax.set_ylabel("generated requests/s")
        ax.set_title("generate_until: speed (label: x plain)", fontsize=9)
        ax.margins(y=0.15)
        agree = gen.get("agreement")
        lines.append(f"generation: {gcfg.get('requests', '?')} requests, {gcfg.get('new_tokens', '?')} new tokens, "
                     f"steps {gcfg.get('steps', '?')}, block {gcfg.get('block_size', '?')}, greedy, max_batch "
                     f"{gcfg.get('max_batch', '?')}; tokens equal to the oracle's "
                     + ("n/a" if agree is None else f"{agree:g}%"))
    for ax in fig.axes:
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    vocab = cfg.get("vocab")
    title = (f"bench eval: mmBERT, {cfg.get('layers', '?')} layers, random weights, vocab {vocab:,}"
             if isinstance(vocab, int) else f"bench eval: {cfg.get('layers', '?')} layers")
    title += f"; {cfg.get('dtype', '?')} on {cfg.get('device', '?')}"
    _finish(fig, title, "\n".join(lines), report.get("machine"))
    return fig


# ------------------------------------------------------------------------------------------ saved reports
def report_kind(report) -> str | None:
    """What a report is: "throughput", "serve", "eval", "overhead", or None when it is none of them."""
    if not isinstance(report, dict):
        return None
    if report.get("bench") == "eval-likelihood" and isinstance(report.get("results"), list):
        return "eval"  # a report from before the generation phase
    if report.get("bench") == "eval" and (isinstance(report.get("results"), list)
                                          or isinstance(report.get("generation"), dict)):
        return "eval"
    if isinstance(report.get("modes"), dict) and isinstance(report.get("config"), dict):
        return "throughput"
    if isinstance(report.get("latency_s"), dict) and isinstance(report.get("ttfc_s"), dict):
        return "serve"
    if isinstance(report.get("rows"), list):
        return "overhead"
    return None


def plot_reports(reports: list[dict], names: list[str] | None = None):
    """The figure of saved reports: one throughput or eval report, or one or more serve reports (one
    per concurrency); anything else is a DiffutronError naming the file."""
    names = names or [f"report {i + 1}" for i in range(len(reports))]
    kinds = []
    for report, name in zip(reports, names):
        kind = report_kind(report)
        if kind not in KINDS:
            what = "an overhead report" if kind == "overhead" else "not a benchmark report"
            raise DiffutronError(f"{name} is {what}; bench plot draws {', '.join(KINDS)} reports")
        kinds.append(kind)
    if len(set(kinds)) > 1:
        raise DiffutronError(f"the reports are of different benchmarks ({', '.join(dict.fromkeys(kinds))}); "
                             "plot one kind at a time")
    kind = kinds[0]
    if kind != "serve" and len(reports) > 1:
        raise DiffutronError(f"give one {kind} report (several reports are drawn together only for serve: "
                             "one per concurrency)")
    try:
        if kind == "serve":
            return plot_serve(reports)
        return plot_throughput(reports[0]) if kind == "throughput" else plot_eval(reports[0])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # an edited or cut report
        raise DiffutronError(f"{', '.join(names)}: a {kind} report this version cannot read "
                             f"({type(exc).__name__}: {str(exc)[:120]})") from None
