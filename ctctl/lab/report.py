"""An experiment's report, written into its directory after every run:

    summary.json      every run's figures (ctctl.lab.experiment.summarize)
    summary.md        the same as a table, one row per run
    run-NN/           box.yaml, samples.jsonl (one record per second),
                      summary.json, timeseries.png
    sweep.png         each summary figure against the runs of the sweep
    report.md         the page that shows them all

Plots are matplotlib's (the Agg backend: no display needed).
"""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = [   # (title, how to get it from a summary, format)
    ("hit ratio", lambda s: s.get("hit_ratio"), "{:.1%}"),
    ("in hw (mean)", lambda s: s.get("hardware_mean"), "{:,.0f}"),
    ("in hw (max)", lambda s: s.get("hardware_max"), "{:,}"),
    ("in hw (end)", lambda s: s.get("hardware_end"), "{:,}"),
    ("soft (mean)", lambda s: s.get("soft_mean"), "{:,.0f}"),
    ("pending (max)", lambda s: s.get("pending_max"), "{:,}"),
    ("offloaded", lambda s: s.get("offloaded"), "{:,}"),
    ("removed", lambda s: sum((s.get("removed") or {}).values()), "{:,}"),
    ("punted", lambda s: s["packets"]["punted"], "{:,}"),
    ("lost", lambda s: s["packets"]["perf_lost"] + s["packets"]["ring_lost"], "{:,}"),
    ("staleness p99 s", lambda s: (s.get("staleness") or {}).get("p99_s"), "{:.2f}"),
    ("aging CPU s", lambda s: s.get("aging_cpu_s"), "{:.3f}"),
    ("entries read", lambda s: s.get("aging_entries_read"), "{:,}"),
    ("ctl CPU", lambda s: s.get("ctl_cpu_mean"), "{:.0%}"),
    ("ctl RSS MB", lambda s: s.get("ctl_rss_max_mb"), "{:.0f}"),
    ("offload p50 µs", lambda s: (s.get("latency") or {}).get("p50_us"), "{:,.0f}"),
]
# What the sweep plot shows, against the runs.
SWEEP_PLOTS = ["hit ratio", "in hw (mean)", "pending (max)", "staleness p99 s", "aging CPU s", "ctl CPU"]


def cell(fmt: str, v) -> str:
    return "–" if v is None else fmt.format(v)


def table(sc, results) -> str:
    keys = sc.sweep_keys
    head = ["run"] + keys + [c[0] for c in COLUMNS]
    rows = []
    for r in results:
        rows.append([str(r.run.index + 1)] + [_value(r.run.values.get(k)) for k in keys]
                    + [cell(fmt, get(r.summary)) for _, get, fmt in COLUMNS])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _value(v) -> str:
    if isinstance(v, dict):
        return " ".join(f"{k}={_value(x)}" for k, x in v.items())
    return "–" if v is None else str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timeseries(res, path: Path) -> None:
    """One run, second by second: occupancy, hit ratio, rates, controller."""
    plt = _plt()
    s = res.samples
    t = [x["t"] for x in s]
    fig, ax = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    for key in ("hardware", "soft", "pending", "conntrack"):
        ax[0].plot(t, [x[key] for x in s], label=key)
    ax[0].set_ylabel("connections")
    ax[0].legend(loc="upper left", fontsize="small")
    ax[1].plot(t, [x["hit_ratio"] if x["hit_ratio"] is not None else float("nan") for x in s])
    ax[1].set_ylabel("hit ratio")
    ax[1].set_ylim(0, 1.02)
    ax[2].plot(t, [x["offloads_ps"] for x in s], label="offloads/s")
    ax[2].plot(t, [sum(x["removals_ps"].values()) for x in s], label="removals/s")
    ax[2].plot(t, [x["punts_ps"] for x in s], label="punts/s")
    ax[2].set_yscale("symlog")
    ax[2].legend(loc="upper left", fontsize="small")
    ax[3].plot(t, [x["ctl_cpu"] * 100 for x in s], label="controller CPU %")
    ax[3].plot(t, [x["aging_cpu_s"] * 100 for x in s], label="its aging's CPU %")
    ax[3].set_ylabel("% of a core")
    ax[3].set_xlabel("seconds")
    ax[3].legend(loc="upper left", fontsize="small")
    fig.suptitle(f"run {res.run.index + 1}: {res.run.label()}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def sweep_plot(sc, results, path: Path) -> None:
    """Each summary figure against the runs, labelled by the values swept."""
    plt = _plt()
    cols = {c[0]: c for c in COLUMNS}
    labels = ["\n".join(_value(r.run.values.get(k)) for k in sc.sweep_keys) or str(r.run.index + 1)
              for r in results]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, name in zip(axes.flat, SWEEP_PLOTS):
        get = cols[name][1]
        ys = [get(r.summary) for r in results]
        ax.bar(range(len(ys)), [y if y is not None else 0 for y in ys])
        ax.set_title(name, fontsize="medium")
        if all(y is None for y in ys):
            ax.text(0.5, 0.5, "none in these runs", transform=ax.transAxes, ha="center", va="center")
            ax.set_yticks([])
        ax.set_xticks(range(len(ys)), labels, fontsize="x-small")
    fig.suptitle(f"{sc.name}: {', '.join(sc.sweep_keys) or 'one run'}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(sc, results, out: Path) -> None:
    """Everything so far (called after each run: a long sweep stopped half
    way still has a report of what ran)."""
    last = results[-1]
    timeseries(last, last.dir / "timeseries.png")
    (out / "summary.json").write_text(json.dumps([{"run": r.run.index + 1, **r.summary} for r in results],
                                                 indent=1))
    (out / "summary.md").write_text(table(sc, results))
    sweep_plot(sc, results, out / "sweep.png")
    page = [f"# {sc.name}", "", sc.description, "",
            f"Scenario: `{sc.path}`; {len(results)} of {len(sc.runs)} runs.", "",
            table(sc, results), "![the sweep](sweep.png)", ""]
    for r in results:
        rel = r.dir.relative_to(out)
        w = r.summary.get("workload", {})
        page += [f"## Run {r.run.index + 1}: {r.run.label()}", "",
                 f"Workload: `{json.dumps(w)}`", "",
                 f"Packets: `{json.dumps(r.summary.get('packets'))}`", "",
                 f"![run {r.run.index + 1}]({rel}/timeseries.png)", ""]
    (out / "report.md").write_text("\n".join(page))
