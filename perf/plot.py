#!/usr/bin/env python3
"""Draws the PNGs for perf/results from what perf/bench.py wrote there.

usage: perf/plot.py [DIR]      (DIR: perf/results by default)

  DIR/<scenario>-latency.png   latency percentile curves, one per system,
                               from the median round's .hgrm files
  DIR/throughput.png           each scenario's throughput per system,
                               relative to rsbroker, with the open-loop target
  DIR/cpu.png                  the system under test's CPU time per operation

Needs matplotlib (pip install matplotlib).
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402

COLORS = {"rsbroker": "tab:blue", "nats": "tab:orange", "direct": "tab:green",
          "tcp-pingpong": "tab:gray"}


def read_hgrm(path):
    """(percentile, value µs) pairs of an HdrHistogram percentile distribution."""
    points = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or line.startswith("#"):
                continue
            try:
                value, pct = float(parts[0]), float(parts[1])
            except ValueError:
                continue
            points.append((pct, value))
    return points


def latency_plot(out, name, entry):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for system in entry["systems"]:
        path = os.path.join(out, "%s-%s.hgrm" % (name, system))
        if not os.path.exists(path):
            continue
        pts = [(p, v) for p, v in read_hgrm(path) if p < 1.0]
        if not pts:
            continue
        xs = [1.0 / (1.0 - p) for p, _ in pts]
        ax.plot(xs, [v for _, v in pts], label=system, color=COLORS.get(system))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000, 100000]
    labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: dict(zip(ticks, labels)).get(x, "")))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (µs)")
    ax.set_title("%s: %s" % (name, entry["what"]), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    path = os.path.join(out, "%s-latency.png" % name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def throughput_value(entry, system):
    r = entry["systems"][system]["median"]
    kind = r.get("ops_kind")
    if kind == "items":
        return r.get("items_per_s") or 0
    if kind == "delivered":
        return r.get("delivered_per_s") or 0
    return r.get("achieved_rps") or 0


def bar_plot(out, summary, value, ylabel, title, filename, log=False):
    names = list(summary["scenarios"])
    systems = ["rsbroker", "nats", "direct"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.27
    for k, system in enumerate(systems):
        xs, ys = [], []
        for i, name in enumerate(names):
            e = summary["scenarios"][name]
            if system in e["systems"]:
                v = value(e, system)
                if v is not None:
                    xs.append(i + (k - 1) * width)
                    ys.append(v)
        ax.bar(xs, ys, width, label=system, color=COLORS[system])
    # Open-loop targets, as markers over the bars they apply to.
    for i, name in enumerate(names):
        e = summary["scenarios"][name]
        for k, system in enumerate(systems):
            s = e["systems"].get(system)
            if s and s.get("target_rps") and filename == "throughput.png":
                ax.plot([i + (k - 1) * width], [s["target_rps"]], marker="_", markersize=14,
                        color="black")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    written = []
    for name, entry in summary["scenarios"].items():
        p = latency_plot(out, name, entry)
        if p:
            written.append(p)
    written.append(bar_plot(
        out, summary, throughput_value, "operations/s (requests, items or deliveries)",
        "Throughput per scenario (black marks: open-loop target rate)", "throughput.png", log=True))
    written.append(bar_plot(
        out, summary, lambda e, s: e["systems"][s]["median"].get("sut_cpu_us_per_op"),
        "µs of CPU per operation", "CPU time of the system under test per operation",
        "cpu.png", log=True))
    for p in written:
        print(p)


if __name__ == "__main__":
    main()
