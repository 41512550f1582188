"""bench/gpu.sh runs rarely (only where a GPU is lent): its CPU smoke run keeps it from rotting in between."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu


def test_the_gpu_benchmark_runs_on_a_tiny_cpu_config(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    gpu.main(
        [
            "--device=cpu",
            "--tiny",
            "--batches=3",
            "--repeats=1",
            "--prompt-len=6",
            "--new-tokens=8",
            "--engines=engine,engine_stock,fused",
            "--runner-steps=graphs,graphs_stock",
            f"--out={out}",
        ]
    )
    results = json.loads(out.read_text())
    check = results["static_decode_check"]
    # Fused layers (eager on a CPU), plain and compiled, give the stock layers' greedy tokens step for step.
    assert check["projections_fused"] is True
    assert check["steps_token_equal"] == check["compiled_steps_token_equal"] == check["group_steps_token_equal"]
    assert check["steps_token_equal"] == "80/80"
    assert results["decode_kernel_check"] == {"supported": False}  # the kernel is for CUDA
    row = results["batches"]["3"]
    assert set(row["engines"]) == {"engine", "engine_stock", "fused"}
    for engine in row["engines"].values():
        assert engine["tokens_per_s"] > 0 and engine["step_s"] > 0 and engine["over_bare"] > 0
    assert set(row["runner_step_s"]) == {"graphs", "graphs_stock"}
    assert row["rows_agreeing_default_vs_stock_eager_32_tokens"] == "3/3"  # float32: the same greedy tokens
    assert 0 < row["mixed_over_single"] < 10
