# Copyright 2026 The siglip2-navit authors. Licensed under the Apache License, Version 2.0.
"""tools/benchmark_encode.py: the engines' ratios it reports."""

import argparse

from siglip2_navit.tools.benchmark_encode import engine_ratios


def _results(local, local_x, ray, ray_x):
    return {"local_workers_0": {"loop_s": local}, "local_workers_0_x5": {"loop_s": local_x},
            "ray_workers_0": {"loop_s": ray}, "ray_workers_0_x5": {"loop_s": ray_x}}


def test_ratios_at_each_size_and_marginal():
    args = argparse.Namespace(images=48, scale=5)
    # local: 48 images in 6 s, 240 in 30 s (8 img/s); ray: 12 s fixed cost + 10 img/s
    (_, line) = engine_ratios(_results(6.0, 30.0, 12.0 + 4.8, 12.0 + 24.0), args)
    assert "0.36× at 48 images" in line  # 6 / 16.8
    assert "0.83× at 240" in line  # 30 / 36
    assert "marginal (the 192 more images): 1.25×" in line  # (192 / 19.2) / (192 / 24)


def test_no_ratio_without_both_engines_and_no_marginal_from_noise():
    args = argparse.Namespace(images=48, scale=5)
    assert engine_ratios({"local_workers_0": {"loop_s": 1.0}}, args) == []
    (_, line) = engine_ratios(_results(6.0, 30.0, 20.0, 19.0), args)
    assert "marginal (the 192 more images): undefined" in line
