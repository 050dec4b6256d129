# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""navit-benchmark, statistics: spreads over rounds, paired ratios, verdicts, and the stated targets judged from them."""


import statistics
from dataclasses import dataclass
from typing import Callable, Optional








# ----------------------------------------------------------------------------------------------------------------------
# Spreads, verdicts and targets: no figure is printed as a result unless its rounds agree on it
# ----------------------------------------------------------------------------------------------------------------------

TIE_TOLERANCE = 0.02  # a ratio whose every round lies within 1 ± this is reported as a tie, not as noise


def spread(samples: list[float]) -> dict:
    """min / median / max of a figure's samples (one per timed round), and how many there were."""
    if not samples:
        raise ValueError("spread() needs at least one sample")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "rounds": len(samples)}


def exact(value: float) -> dict:
    """A figure measured once, without timing noise (an accuracy metric): its spread is the value itself."""
    return {**spread([value]), "rounds": 0}


def paired_ratio(numerator: dict, denominator: dict) -> dict:
    """Per-round ratios of two contenders timed by `time_interleaved` in the same rounds: median, min, max. Each
    round's ratio compares two calls made back to back, so a drift of the machine's load cancels out."""
    ratios = [a / b for a, b in zip(numerator["times_s"], denominator["times_s"])]
    return {**spread(ratios), "paired": True}


def unpaired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """The ratio of two figures timed in different rounds (a matmul floor and a contender): median ÷ median, with the
    widest range any pair of their samples allows (min ÷ max … max ÷ min), since no round pairs them."""
    return {
        "median": statistics.median(numerator) / statistics.median(denominator),
        "min": min(numerator) / max(denominator),
        "max": max(numerator) / min(denominator),
        "rounds": min(len(numerator), len(denominator)),
        "paired": False,
    }


def ratio_verdict(figure: dict, bounded_by_one: bool = False) -> str:
    """What a ratio (× faster, fraction of a floor) may be reported as.

    "result": every round agrees on the side of 1 it lies on, so the median is a result. "tie": the rounds straddle 1
    but all lie within 1 ± TIE_TOLERANCE (no difference that this run can resolve). "noisy": the rounds straddle 1 by
    more than that: the spread is wider than the effect the median would claim, so it is not a result.
    With `bounded_by_one` (a fraction of a floor or a peak: nothing can run faster than the bare matmuls), a median
    above 1 is a "measurement error"."""
    low, median, high = figure["min"], figure["median"], figure["max"]
    if bounded_by_one and median > 1:
        return "measurement error"
    if low < 1 < high:
        return "tie" if 1 - TIE_TOLERANCE <= low and high <= 1 + TIE_TOLERANCE else "noisy"
    return "result"


def target_status(figure: dict, threshold: float, higher_is_better: bool) -> str:
    """"met" when every round meets the target, "MISSED" when none does, "noisy" when the rounds straddle it (neither
    can be claimed: rerun with more `--repeats` on a quieter machine). A figure that is a measurement error
    (`verdict`) cannot meet anything, nor can a fraction of a floor whose rounds reach above 100 % ("noisy")."""
    if figure.get("verdict") == "measurement error":
        return "measurement error"
    if figure.get("bounded_by_one") and figure["max"] > 1:
        return "noisy"  # some rounds ran "faster than the floor": those rounds are not measurements of the model
    low, high = figure["min"], figure["max"]
    worst, best = (low, high) if higher_is_better else (-high, -low)
    bound = threshold if higher_is_better else -threshold
    if worst >= bound:
        return "met"
    if best < bound:
        return "MISSED"
    return "noisy"


def with_verdict(figure: dict, bounded_by_one: bool = False) -> dict:
    """The figure with its `verdict` (see ratio_verdict); a fraction of a floor or peak is marked `bounded_by_one`."""
    return {**figure, "verdict": ratio_verdict(figure, bounded_by_one), "bounded_by_one": bounded_by_one}


def format_ratio(figure: Optional[dict], unit: str = "×") -> str:
    """A ratio as printed: the median with its spread when it is a result or a tie, otherwise only the spread and why.
    `unit` "%" prints fractions as percentages."""
    if figure is None:
        return ""
    scale, fmt = (100, "{:.0f}") if unit == "%" else (1, "{:.2f}")
    suffix = " %" if unit == "%" else "×"
    low, median, high = (fmt.format(scale * figure[k]) for k in ("min", "median", "max"))
    rng = low if low == high else f"{low}–{high}"
    verdict = figure.get("verdict", "result")
    if verdict == "measurement error":
        return f"measurement error ({median}{suffix} > 100 %)"
    if verdict == "noisy":
        return f"noisy ({rng}{suffix})"
    if verdict == "tie":
        return f"tie ({rng}{suffix})"
    return f"{median}{suffix} ({rng})" if low != high else f"{median}{suffix}"

# ----------------------------------------------------------------------------------------------------------------------
# Targets: fp32 and bf16 on CPU, GPU
# ----------------------------------------------------------------------------------------------------------------------


def _contender(w: dict, name: str, dtype: str) -> Optional[dict]:
    return next((c for c in w["contenders"] if c["name"] == name and c["dtype"] == dtype and "error" not in c), None)


def _contender_figure(key: str) -> Callable[[dict, str], Optional[dict]]:
    def figure(w: dict, dtype: str) -> Optional[dict]:
        c = _contender(w, "packed-sdpa", dtype)
        return None if c is None else c.get(key)

    return figure


@dataclass(frozen=True)
class Target:
    description: str
    threshold: float
    higher_is_better: bool
    figure: Callable[[dict, str], Optional[dict]]  # (workload entry, dtype) -> the figure, None when not measured
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    headline_only: bool = True  # only on the *mixed* workload (the headline workload)
    device: Optional[str] = None  # only on this device type
    unit: str = "×"
    full_only: bool = False  # stated for the full run's workload (quick's *mixed* pads far less, see padded_flop_ratio)


TARGETS = (
    Target("≥ 3× padded naflex (transformers' Siglip2VisionModel, same weights)", 3.0, True, _contender_figure("vs_naflex_padded"),
           full_only=True),
    Target("packing never slower than the per-image loop", 1.0, True,
           lambda w, dtype: w.get("packed_vs_per_image", {}).get(dtype), headline_only=False),
    Target("fp32 ≥ 85 % of its matmul floor", 0.85, True, _contender_figure("of_floor"),
           dtypes=("fp32",), unit="%"),
    Target("bf16 ≥ 85 % of its matmul floor", 0.85, True, _contender_figure("of_floor"),
           dtypes=("bf16",), unit="%"),
    Target("bf16 speed-up over fp32 ≥ 85 % of the floors' own ratio (fp32 floor ÷ bf16 floor)", 0.85, True,
           lambda w, dtype: w.get("bf16_vs_fp32", {}).get("speedup_of_floor_ratio"), dtypes=("bf16",), unit="%"),
    Target("bf16 vs fp32 min per-token cosine ≥ 0.999", 0.999, True,
           lambda w, dtype: w.get("bf16_vs_fp32", {}).get("min_token_cosine"), dtypes=("bf16",),
           headline_only=False, unit=""),
    Target("GPU: ≥ 55 % of the bf16 matmul peak (MFU)", 0.55, True, _contender_figure("of_matmul_peak"),
           dtypes=("bf16",), device="cuda", unit="%"),
    Target("GPU: ≥ 1.3× the sync-per-layer design", 1.3, True,
           lambda w, dtype: w.get("packed_vs_sync_per_layer", {}).get(dtype), dtypes=("bf16",), device="cuda"),
)
TOKEN_DROPPING_TARGET = 0.65  # keep 50 %: at most 65 % of the full forward's time


def _target_result(target: str, workload: str, figure: dict, threshold: float, higher: bool, unit: str) -> dict:
    return {"target": target, "workload": workload, "figure": figure, "threshold": threshold, "unit": unit,
            "status": target_status(figure, threshold, higher)}


def evaluate_targets(report: dict) -> list[dict]:
    """Every stated target that this run measured, with the figure it was judged on and its status."""
    results = []
    for target in TARGETS:
        if (target.device is not None and target.device != report["device"]) or (target.full_only and report["quick"]):
            continue
        for w in report["workloads"]:
            if target.headline_only and w["name"] != "mixed":
                continue
            for dtype in target.dtypes:
                figure = target.figure(w, dtype)
                if figure is not None:
                    results.append(_target_result(f"{target.description} [{dtype}]", w["name"], figure,
                                                  target.threshold, target.higher_is_better, target.unit))
    d = report.get("token_dropping")
    if d:
        results.append(_target_result(f"keep 50 % of tokens: ≤ 65 % of the full forward [{d['dtype']}]",
                                      d["workload"], d["time_fraction"], TOKEN_DROPPING_TARGET, False, "%"))
    return results


def summarize(report: dict) -> dict:
    """The targets by status and the number of figures flagged noisy or as measurement errors."""
    targets = report["targets"]
    by = lambda status: [f"{t['target']} on {t['workload']}" for t in targets if t["status"] == status]  # noqa: E731
    flagged = 0
    for w in report["workloads"]:
        figures = [f for c in w["contenders"] for f in (c.get("vs_naflex_padded"), c.get("of_floor"),
                                                        c.get("of_matmul_peak")) if f]
        figures += list(w.get("packed_vs_per_image", {}).values())
        flagged += sum(f.get("verdict") in ("noisy", "measurement error") for f in figures)
    return {"met": by("met"), "missed": by("MISSED"), "noisy": by("noisy"), "errors": by("measurement error"),
            "flagged_figures": flagged}


