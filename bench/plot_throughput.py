"""docs/throughput.png from bench/e2e.py JSON lines: output tokens/s per workload and policy, beside the floor.

    python bench/plot_throughput.py e2e.jsonl [more.jsonl ...] -o docs/throughput.png

Reads every line that is a JSON object with ``"bench": "e2e"`` (other lines are skipped, so a whole
log works as input). Bars: one group per workload, one bar per policy (transformers as "hf", CUDA-graph runs as
"batchllm+graphs"); the
floor's output tokens/s (DESIGN.md performance model) is a black tick over each group. The y axis is
logarithmic: the baseline and the floor differ by orders of magnitude. When a file holds several runs
of the same (workload, policy, model, device), the last one is plotted.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# The engine's defaults on CUDA are graphs + overlap (since 2026-11-27): those bars first.
POLICY_ORDER = ["batchllm+graphs+overlap", "fcfs-lru+graphs+overlap", "batchllm+graphs", "batchllm", "fcfs-lru",
                "no-share", "hf"]
POLICY_COLORS = {"batchllm+graphs+overlap": "#2ca02c", "fcfs-lru+graphs+overlap": "#ff7f0e",
                 "batchllm+graphs": "#17becf", "batchllm": "#1f77b4", "fcfs-lru": "#ffbb78", "no-share": "#7f7f7f",
                 "hf": "#d62728"}
# Bars of other labels (kernel variants, A/B runs) take these in order: never a known bar's color.
OTHER_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"]


def read_rows(paths) -> list:
    """The e2e rows of the files, in order."""
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("bench") == "e2e":
                rows.append(row)
    return rows


def label(row: dict) -> str:
    """The bar a row belongs to: its policy, "+graphs" when decode steps replayed CUDA graphs,
    "+overlap", the kernel variants the environment chose (e.g. "+merge+mma128"), and sampling set
    apart from the workload's ("+t1", "+top_p0.9")."""
    variants = "".join(f"+{value}" for _, value in sorted(row.get("kernel_env", {}).items()))
    sampling = ("" if row.get("temperature") is None else f"+t{row['temperature']:g}") + \
        ("" if row.get("top_p", 1.0) >= 1.0 else f"+top_p{row['top_p']:g}")
    return (row["policy"] + ("+graphs" if row.get("cuda_graphs") else "") + ("+overlap" if row.get("overlap") else "")
            + variants + sampling)


def group(row: dict) -> str:
    """The bar group of a row: its workload, with its scale when not the full workload ("W1 x0.25")."""
    scale = row.get("scale", 1) or 1
    return row["workload"] if scale == 1 else f"{row['workload']} x{scale:g}"


def latest_by_key(rows) -> dict:
    """(workload group, label) -> the last row of each; raises if the rows mix models or devices."""
    setups = {(r["model"], r.get("device_name", r["device"])) for r in rows}
    if len(setups) > 1:
        raise ValueError(f"rows from several model/device setups {sorted(setups)}: plot one at a time")
    return {(group(r), label(r)): r for r in rows}


def bar_order(table: dict) -> list:
    """The bars of each group: known labels in POLICY_ORDER, then any other label (a new kind of run is
    drawn, never dropped)."""
    labels = {label for _, label in table}
    return [p for p in POLICY_ORDER if p in labels] + sorted(labels - set(POLICY_ORDER))


def plot(rows, output: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no bench/e2e.py rows in the input")
    table = latest_by_key(rows)
    workloads = sorted({w for w, _ in table})
    policies = bar_order(table)
    width = 0.8 / max(len(policies), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.5 * len(workloads)), 4.2))
    others = iter(OTHER_COLORS * (1 + len(policies) // len(OTHER_COLORS)))
    for i, policy in enumerate(policies):
        xs, ys = [], []
        for j, workload in enumerate(workloads):
            row = table.get((workload, policy))
            if row is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(row["output_tokens_per_s"])
        ax.bar(xs, ys, width, label=policy, color=POLICY_COLORS.get(policy) or next(others))
    for j, workload in enumerate(workloads):
        floors = [r["floor_output_tokens_per_s"] for (w, _), r in table.items()
                  if w == workload and r.get("floor_output_tokens_per_s") and r["policy"] != "hf"]
        if floors:
            ax.hlines(max(floors), j - 0.45, j + 0.45, colors="black", linewidth=2,
                      label="floor" if j == 0 else None)
    any_row = next(iter(table.values()))
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_yscale("log")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{any_row['model']} on {any_row.get('device_name', any_row['device'])} "
                 f"(commit {any_row.get('commit', '?')})", fontsize=9)
    # Beside the axes, one label a line: run labels name graphs, overlap and kernel choices and get long.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="files with bench/e2e.py JSON lines")
    parser.add_argument("-o", "--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "throughput.png"))
    args = parser.parse_args(argv)
    path = plot(read_rows(args.inputs), Path(args.output))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
