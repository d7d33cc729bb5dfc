"""The comparison report of stage=eval: report.md and PNG plots, rendered from results.json's numbers only."""

from __future__ import annotations

import math
from pathlib import Path

from alignlab.checkpoint import atomic_write_text
from alignlab.evaluation.plots import _save

RATES = (
    ("harmlessness", "harmlessness (harmful prompts)"),
    ("helpfulness", "helpfulness (benign prompts)"),
    ("attack_success", "attack success (suffix attacks)"),
)
# a TinyHH world with a held-out split (data.tinyhh.heldout_*): the same rates on what no training data held
HELDOUT_RATES = (
    ("harmlessness_heldout", "harmlessness, held-out topics"),
    ("helpfulness_heldout", "helpfulness, held-out topics"),
    ("attack_success_heldout", "attack success, held-out suffixes"),
)


def rates_in(results: dict) -> tuple[tuple[str, str], ...]:
    """The report's rate columns: RATES, then the HELDOUT_RATES some system has."""
    systems = results["systems"].values()
    return RATES + tuple((k, label) for k, label in HELDOUT_RATES if any(k in m for m in systems))


def pct(rate: dict | None) -> str:
    """A rate as the report prints it: '83.0% [77.2, 87.6]' (value and 95% Wilson interval, in percent)."""
    if rate is None:
        return "-"
    return f"{100 * rate['value']:.1f}% [{100 * rate['ci_low']:.1f}, {100 * rate['ci_high']:.1f}]"


def points(d: dict | None) -> str:
    """A difference of rates as the report prints it: '+12.5 [+3.1, +21.0]' (percentage points, 95% interval)."""
    if d is None:
        return "-"
    return f"{100 * d['value']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"


def decoding(system: dict) -> str:
    """How a system's answers were made, in a few words: 'greedy', 'sample, T=1', 'answers file'."""
    if system.get("model") is None:
        return "answers file"
    if system["decoding"] == "greedy":
        return "greedy"
    return f"{system['decoding'].replace('_', ' ')}, T={system['temperature']:g}"


def comparisons(results: dict) -> list[str]:
    """The differences each system asks for (stage.systems.<name>.compare_to), in the order it names them."""
    systems = results["systems"]
    targets = {o for row in results["comparisons"].values() for o in row}
    lines = [
        "",
        "## Compared systems (stage.systems.<name>.compare_to; percentage points, 95% Newcombe interval)",
        "",
    ]
    if any(
        systems[o]["system"].get("decoding") == "greedy" and systems[o]["system"].get("model")
        for o in targets
    ):
        lines += [
            "Greedy decoding is the RAIN paper's vanilla (the authors' baseline is HF generate()'s default, greedy); "
            "sampling at T = 1 is ours.",
            "",
        ]
    rates = rates_in(results)
    lines.append("| system | minus | " + " | ".join(k for k, _ in rates) + " |")
    lines.append("|---|---|" + "---|" * len(rates))
    for name, row in results["comparisons"].items():
        for other, diffs in row.items():
            cells = " | ".join(points(diffs.get(k)) for k, _ in rates)
            lines.append(f"| {name} | {other} ({decoding(systems[other]['system'])}) | {cells} |")
    return lines


def flops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: dict, plots: list[str]) -> str:
    systems, base = results["systems"], results["baseline"]
    served = results.get("served_answers", 0)
    rates = rates_in(results)
    lines = [
        "# Evaluation report",
        "",
        f"{len(systems)} systems, {results['prompts']} prompts, judge: {results['judge']}. Rates with 95% Wilson "
        f"intervals; win rate = wins / (wins + losses) on the judge's score, against `{base}`.",
        "",
        "| system | "
        + " | ".join(label for _, label in rates)
        + f" | win rate vs {base} | RM score | KL to reference | pretraining loss | inference FLOPs per answer"
        + f" | training FLOPs | total FLOPs at {served:,} answers |",
        "|---|" + "---|" * (len(rates) + 7),
    ]
    for name, m in systems.items():
        wr = results["win_rates"].get(name, {}).get(base)
        win = (
            "-"
            if wr is None
            else f"{100 * wr['rate']:.1f}% [{100 * wr['ci_low']:.1f}, {100 * wr['ci_high']:.1f}]"
        )
        lines.append(
            f"| {name} | "
            + " | ".join(pct(m.get(k)) for k, _ in rates)
            + f" | {win} | {num(m.get('rm_score'))} | {num(m.get('kl'))} | {num(m.get('ptx_loss'), 4)}"
            + f" | {flops(m.get('inference_flops_per_answer'))} | {flops(m.get('training_flops'))}"
            + f" | {flops(m.get('total_flops'))} |"
        )
    if results.get("differences"):
        lines += ["", f"## Differences to {base} (percentage points, 95% Newcombe interval)", ""]
        lines.append("| system | " + " | ".join(k for k, _ in rates) + " |")
        lines.append("|---|" + "---|" * len(rates))
        for name, diffs in results["differences"].items():
            lines.append(f"| {name} | " + " | ".join(points(diffs.get(k)) for k, _ in rates) + " |")
    if results.get("comparisons"):
        lines += comparisons(results)
    lines += ["", "## Win rates (row against column)", ""]
    names = list(systems)
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for a in names:
        cells = ["-" if a == b else f"{100 * results['win_rates'][a][b]['rate']:.1f}%" for b in names]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    if results.get("skipped"):
        lines += ["", f"Skipped (model or answers missing): {', '.join(results['skipped'])}."]
    lines += [
        "",
        "KL: mean log-prob ratio of a system's own answers to the reference model (sampled systems at T = 1 only; "
        "best-of-N's KL is at most log N - (N-1)/N). Pretraining loss: held-out pretraining text, nats per token. "
        "Inference FLOPs per answer: 2 x parameters x the positions the policy and the reward model(s) computed "
        "for it (prompt and answer through the KV cache; best-of-N's N samples and their scoring; a guided "
        "decoding's candidates; an answers file's from the inference_cost.json its stage wrote, else '-'). "
        "Training FLOPs: every stage after pretraining behind the system's models (its policy's chain, and the "
        "reward model's where it decodes with one), each once, from their compute.json (6 x parameters x trained "
        f"tokens, 2 x for forwards). Total: training + {served:,} answers x inference per answer.",
        "",
    ]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path, curves: dict[str, str] | None = None) -> list[Path]:
    """report.md and the plots (rates.png, tradeoff.png, win_rates.png, cost.png, total_cost.png, reward_kl.png)
    into out_dir."""
    out_dir = Path(out_dir)
    plots = [plot_rates(results, out_dir / "rates.png"), plot_tradeoff(results, out_dir / "tradeoff.png")]
    plots.append(plot_win_rates(results, out_dir / "win_rates.png"))
    plots.append(plot_cost(results, out_dir / "cost.png"))
    plots.append(
        plot_cost(
            results,
            out_dir / "total_cost.png",
            cost="total_flops",
            xlabel=f"total FLOPs (training + {results.get('served_answers', 0):,} answers)",
            title="Quality vs total cost: training + inference (dashed: Pareto front)",
        )
    )
    plots.append(plot_reward_kl(results, curves or {}, out_dir / "reward_kl.png"))
    plots = [p for p in plots if p is not None]
    atomic_write_text(out_dir / "report.md", markdown(results, [str(p) for p in plots]))
    return [out_dir / "report.md", *plots]


def error_bar(rate: dict) -> list[list[float]]:
    """[[below], [above]] in percent for matplotlib; a bound a rounding error inside the rate counts as 0."""
    return [
        [max(0.0, 100 * (rate["value"] - rate["ci_low"]))],
        [max(0.0, 100 * (rate["ci_high"] - rate["value"]))],
    ]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rates(results: dict, path: Path) -> Path | None:
    """Grouped bars: each rate per system with its 95% interval."""
    systems = results["systems"]
    present = [(k, label) for k, label in rates_in(results) if any(k in m for m in systems.values())]
    if not present:
        return None
    plt = _plt()
    names = list(systems)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    width = 0.8 / len(present)
    for i, (key, label) in enumerate(present):
        xs, ys, err = [], [], [[], []]
        for j, name in enumerate(names):
            r = systems[name].get(key)
            if r is None:
                continue
            xs.append(j + (i - (len(present) - 1) / 2) * width)
            ys.append(100 * r["value"])
            low, high = error_bar(r)
            err[0] += low
            err[1] += high
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label, color=f"C{i}")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("Oracle rates with 95% intervals")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_tradeoff(results: dict, path: Path) -> Path | None:
    """Helpfulness against harmlessness, one point per system (up and to the right is better)."""
    pts = {n: m for n, m in results["systems"].items() if "harmlessness" in m and "helpfulness" in m}
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, (name, m) in enumerate(pts.items()):
        h, u = m["harmlessness"], m["helpfulness"]
        ax.errorbar(
            100 * h["value"],
            100 * u["value"],
            xerr=error_bar(h),
            yerr=error_bar(u),
            fmt="o",
            color=f"C{i % 10}",
            capsize=2,
        )
        ax.annotate(
            name, (100 * h["value"], 100 * u["value"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel("harmlessness (%)")
    ax.set_ylabel("helpfulness (%)")
    ax.set_title("Helpful vs harmless (95% intervals)")
    ax.grid(alpha=0.3)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """The systems no other beats on both axes (lower cost, higher quality), in order of cost."""
    front = [
        n
        for n, (c, q) in points.items()
        if not any((c2 <= c and q2 >= q) and (c2, q2) != (c, q) for c2, q2 in points.values())
    ]
    return sorted(front, key=lambda n: points[n][0])


def plot_cost(
    results: dict,
    path: Path,
    cost: str = "inference_flops_per_answer",
    xlabel: str = "inference FLOPs per answer",
    title: str = "Quality vs inference cost (dashed: Pareto front)",
) -> Path | None:
    """Harmlessness and helpfulness against a cost (log scale; default inference FLOPs per answer; total_flops:
    training + inference), the Pareto front of each joined: what quality each system buys per unit of compute."""
    sets = [k for k in ("harmlessness", "helpfulness") if any(k in m for m in results["systems"].values())]
    costed = {n: m for n, m in results["systems"].items() if m.get(cost)}
    if not sets or not costed:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.5), squeeze=False)
    for ax, key in zip(axes[0], sets, strict=True):
        points = {n: (m[cost], m[key]["value"]) for n, m in costed.items() if key in m}
        for i, (name, (c, q)) in enumerate(points.items()):
            ax.errorbar(c, 100 * q, yerr=error_bar(costed[name][key]), fmt="o", color=f"C{i % 10}", capsize=2)
            ax.annotate(name, (c, 100 * q), fontsize=8, xytext=(4, 4), textcoords="offset points")
        front = pareto(points)
        ax.plot([points[n][0] for n in front], [100 * points[n][1] for n in front], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{key} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_win_rates(results: dict, path: Path) -> Path | None:
    """Heatmap of win rates, row system against column system."""
    names = list(results["systems"])
    if len(names) < 2:
        return None
    plt = _plt()
    grid = [[float("nan") if a == b else results["win_rates"][a][b]["rate"] for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(names), 0.8 + 0.7 * len(names)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdBu")
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                ax.text(j, i, f"{100 * grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("Win rate (%), row vs column")
    fig.colorbar(im, ax=ax, fraction=0.046)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def smooth(xs: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_reward_kl(results: dict, curves: dict[str, str], path: Path) -> Path | None:
    """Reward against KL: RL training trajectories (per iteration) and the evaluated systems that have both."""
    from alignlab.tracking import read_metrics

    points = {
        n: m
        for n, m in results["systems"].items()
        if m.get("kl") is not None and m.get("rm_score") is not None
    }
    trajectories = {}
    for name, run_dir in curves.items():
        rows = [r for r in read_metrics(run_dir) if "ppo/kl" in r and "ppo/rm_score" in r]
        if rows:
            trajectories[name] = rows
    if not points and not trajectories:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (name, rows) in enumerate(trajectories.items()):
        kl, score = smooth([r["ppo/kl"] for r in rows]), smooth([r["ppo/rm_score"] for r in rows])
        ax.plot(kl, score, "-", color=f"C{i}", label=f"{name}: training rollouts (mean of 10 iterations)")
        ax.plot(kl[-1], score[-1], ">", color=f"C{i}")
    for name, m in points.items():
        ax.plot(m["kl"], m["rm_score"], "ko", markersize=4)
        ax.annotate(name, (m["kl"], m["rm_score"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("KL to the reference (nats per answer)")
    ax.set_ylabel("reward-model score")
    ax.set_title("Reward vs KL")
    ax.grid(alpha=0.3)
    if trajectories:
        ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
