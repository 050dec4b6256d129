# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-benchmark, report rendering: the markdown report, the one-line summary and the plot."""


import os
import platform
import re
from pathlib import Path
from typing import Optional

import torch





from .bench_stats import TIE_TOLERANCE, format_ratio


# ----------------------------------------------------------------------------------------------------------------------
# Report: markdown, summary line, plot
# ----------------------------------------------------------------------------------------------------------------------


def machine_description(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if names:
            info["cpu"] = f"{names[0]} × {len(names)} logical CPUs"
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_bytes(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def _fmt_time(figure: dict) -> str:
    """A time with its spread over the rounds: median (min–max)."""
    return f"{figure['median']:.3f} ({figure['min']:.3f}–{figure['max']:.3f})"


def _fmt_flops(figure: dict) -> str:
    return f"{figure['median'] / 1e9:,.0f} GFLOP/s ({figure['min'] / 1e9:,.0f}–{figure['max'] / 1e9:,.0f})"


def _label(name: str, dtype: str) -> str:
    return f"{name} [{dtype}]"


TABLE_HEADER = (
    "| workload | images | tokens | contender | time (s): median (min–max) | tokens/s | × vs naflex-padded (paired) "
    "| of floor | of matmul peak | peak memory |"
)


def _floor_rows(w: dict) -> list[str]:
    rows = []
    for dtype, floor in w["floors"].items():
        rows.append(
            f"| {w['name']} | {w['images']} | {w['tokens']} | *matmul floor [{dtype}]* ({floor['kind']}) | "
            f"{_fmt_time(floor)} | {w['tokens'] / floor['median']:,.0f} | | 100 % | "
            f"{w['flops'] / floor['median'] / 1e9:,.0f} GFLOP/s | |"
        )
    return rows


def _contender_row(w: dict, c: dict) -> str:
    label = _label(c["name"], c["dtype"])
    if "error" in c:
        return f"| {w['name']} | | | {label} | {c['error']} | | | | | |"
    return (
        f"| {w['name']} | | | {label} | {_fmt_time(c['time_s'])} | {c['tokens_per_s']:,.0f} | "
        f"{format_ratio(c.get('vs_naflex_padded'))} | {format_ratio(c.get('of_floor'), '%')} | "
        f"{format_ratio(c.get('of_matmul_peak'), '%')} | {_fmt_bytes(c['peak_memory_bytes'])} |"
    )


def _workload_rows(w: dict) -> list[str]:
    rows = _floor_rows(w) + [_contender_row(w, c) for c in w["contenders"]]
    for dtype, diff in w.get("naflex_max_abs_diff", {}).items():
        rows.append(f"| {w['name']} | | | *max abs diff ours vs naflex [{dtype}]* | {diff:.1e} | | | | | |")
    return rows


def _paired_lines(report: dict) -> list[str]:
    lines = []
    for w in report["workloads"]:
        for dtype, ratio in w.get("packed_vs_per_image", {}).items():
            lines.append(f"{w['name']} [{dtype}] {format_ratio(ratio)}")
    if not lines:
        return []
    return ["", "Packing vs the per-image loop (per-image time ÷ packed time, paired round by round; > 1 = packing "
            "wins): " + ", ".join(lines) + "."]


def _bf16_lines(report: dict) -> list[str]:
    lines = []
    for w in report["workloads"]:
        b = w.get("bf16_vs_fp32")
        if not b:
            continue
        kept = ""
        if "speedup_of_floor_ratio" in b:
            kept = (f", while the bare matmuls (the floors) run {format_ratio(b['floor_ratio'])} faster in bf16: the "
                    f"model keeps {format_ratio(b['speedup_of_floor_ratio'], '%')} of what the hardware gives bf16")
        lines.append(
            f"- {w['name']}: packed-sdpa bf16 is {format_ratio(b.get('speedup'))} the fp32 forward's speed (paired)"
            f"{kept}; min per-token cosine vs fp32 {b['min_token_cosine']['median']:.5f}, max abs diff "
            f"{b['max_abs_diff']:.2e}"
        )
    return ["", "bf16 vs fp32 (same weights, same inputs, same rounds):", *lines] if lines else []


def _token_dropping_lines(report: dict) -> list[str]:
    d = report.get("token_dropping")
    if not d:
        return []
    return [
        "",
        f"Token dropping ({d['workload']} [{d['dtype']}], keep {d['keep_fraction']:.0%}: {d['kept_tokens']} of "
        f"{d['tokens']} tokens, timed in the same rounds as the full packed-sdpa forward): "
        f"{format_ratio(d['time_fraction'], '%')} of the full forward's time.",
    ]


def _compile_lines(report: dict) -> list[str]:
    c = report.get("compile")
    if not c:
        return []
    if "error" in c:
        return ["", f"torch.compile: failed: {c['error']}"]
    return [
        "",
        f"torch.compile(model, dynamic=True) ({c['workload']}, sdpa): first call (compile) {c['first_call_s']:.1f} s, "
        f"then {_fmt_time(c['time_s'])} s, speed vs eager (paired) {format_ratio(c['speedup_vs_eager'])}, "
        f"max abs diff vs eager {c['max_abs_diff']:.1e}. A batch of another composition "
        f"({c['new_composition']['images']} of the images, {c['new_composition']['tokens']:,} tokens) right after: "
        f"first call {c['new_composition']['first_call_s']:.2f} s, **{c['new_composition']['new_graphs']} new "
        f"graph(s)** compiled.",
    ]


def _memory_lines(report: dict) -> list[str]:
    s = report.get("memory_scaling")
    if not s:
        return []
    return [
        "",
        "Memory scaling (packed-sdpa peak): " + ", ".join(f"{k}: {_fmt_bytes(v)}" for k, v in s["peaks"].items())
        + f"; largest / (its image factor × the next smaller) = {s['ratio_vs_linear']:.2f} (≤ ~1 means linear).",
    ]


def _target_lines(report: dict) -> list[str]:
    targets = report.get("targets", [])
    if not targets:
        return []
    lines = ["", "| target | workload | measured | status |", "|---|---|---|---|"]
    for t in targets:
        unit = "%" if t["unit"] == "%" else "×"
        measured = (f"{t['figure']['median']:.5f}" if t["unit"] == "" else format_ratio(t["figure"], unit))
        lines.append(f"| {t['target']} | {t['workload']} | {measured} | **{t['status']}** |")
    return lines


def _load(report: dict) -> str:
    """The 1-minute load average when the run started (how busy the machine was), or "?" where unknown."""
    load = report["machine"].get("load_average")
    return "?" if not load else f"{load[0]:.1f}"


def summary_line(report: dict) -> str:
    """One line: how many targets were met, MISSED, noisy or measurement errors, and how many figures were flagged."""
    s = report["summary"]
    parts = [f"{len(s['met'])} met", f"{len(s['missed'])} MISSED", f"{len(s['noisy'])} noisy (undecided)"]
    if s["errors"]:
        parts.append(f"{len(s['errors'])} measurement error(s)")
    line = f"Targets: {', '.join(parts)}."
    if s["missed"]:
        line += " MISSED: " + "; ".join(s["missed"]) + "."
    if s["flagged_figures"]:
        line += (f" {s['flagged_figures']} figure(s) flagged noisy or as measurement errors (machine load average at "
                 f"start {_load(report)}).")
    if machine_busy(report):
        line += " " + busy_note(report)
    return line


def busy_note(report: dict) -> str:
    """What a wall-clock report on a busy machine is worth, and how to measure instead."""
    return (f"**The machine was busy** (load average {_load(report)} on {os.cpu_count()} CPUs at the start): other "
            "processes bias even paired wall-clock figures (a model's many small ops wait for preempted threads more "
            "than the floor's few large GEMMs do); rerun on an idle machine, or with `--threads 1 --timer cpu` "
            "(process CPU time of one thread: time spent descheduled is not counted).")


def machine_busy(report: dict) -> bool:
    """More runnable processes than CPUs when the run started (1-minute load average), with wall-clock timing."""
    load = report["machine"].get("load_average")
    return bool(load) and report.get("timer", "wall") == "wall" and load[0] >= (os.cpu_count() or 1)


def _workload_description(w: dict) -> str:
    longest = max(h * width for _, h, width in w["grids"])
    return (f"{w['name']}: {w['images']} image(s), {w['tokens']:,} tokens, longest {longest:,} (padded to the "
            f"longest, naflex computes {w['padded_flop_ratio']:.2f}× the FLOP)")


def render_markdown(report: dict) -> str:
    m = report["machine"]
    peaks = ", ".join(f"{dtype} {_fmt_flops(p)}" for dtype, p in report["matmul_peak"].items())
    lines = [
        f"## {report['title']}",
        "",
        f"Machine: {m['cpu']}; {m.get('gpu', 'no GPU')}; torch {m['torch']}, "
        f"transformers {m.get('transformers', '?')}, "
        f"{m['threads']} threads, load average at start {_load(report)}. dtype(s) "
        f"{', '.join(report['dtypes'])}. Config: {report['config_description']}. {report['repeats']} interleaved "
        f"rounds after a memory-measuring call and {report['warmup']} warm-up ({report['timer']} time); figures are "
        f"median (min–max) over the rounds. Matmul peak measured: {peaks}. Wall time of this run: "
        f"{report['wall_s']:.0f} s.",
        "",
        report.get("dtype_line", ""),
        *([report["allocator_line"]] if report.get("allocator_line") else []),
        *(["", busy_note(report)] if machine_busy(report) else []),
        "",
        "Workloads: " + "; ".join(_workload_description(w) for w in report["workloads"]) + ".",
        "",
        TABLE_HEADER,
        "|" + "---|" * (TABLE_HEADER.count("|") - 1),
    ]
    for w in report["workloads"]:
        lines += _workload_rows(w)
    lines += _paired_lines(report) + _bf16_lines(report) + _token_dropping_lines(report) + _compile_lines(report)
    lines += _memory_lines(report) + _target_lines(report)
    lines += ["", summary_line(report),
              "", "A ratio is printed as a result only when every round agrees on its side of 1; \"tie\": all rounds "
              f"within ±{TIE_TOLERANCE:.0%}; \"noisy\": the rounds straddle 1 by more (not a result); a fraction of a "
              "floor or peak above 100 % is a measurement error. Targets: met (every round meets it), MISSED (no round "
              "does), noisy (the rounds straddle it)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'siglip2-navit[bench]'): skipping the plot")
        return False
    series: dict[str, list[tuple[int, float]]] = {}
    for w in report["workloads"]:
        for c in w["contenders"]:
            if "error" not in c:
                series.setdefault(_label(c["name"], c["dtype"]), []).append((w["tokens"], c["tokens_per_s"]))
        for dtype, floor in w["floors"].items():
            series.setdefault(f"matmul floor [{dtype}]", []).append((w["tokens"], w["tokens"] / floor["median"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name,
                linestyle="--" if name.startswith("matmul floor") else "-")
    ax.set_xscale("log")
    ax.set_xlabel("total tokens in the batch")
    ax.set_ylabel("tokens / s")
    ax.set_title(report["title"])
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


