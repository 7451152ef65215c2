"""tools/benchmark.py's inference rows: the candidate regimes they promise and the compiled row
(run here with a forced backend; on a GPU it is inductor with CUDA graphs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import benchmark  # noqa: E402  (tools/ is not a package)


def run_benchmark(tmp_path, *extra):
    out = tmp_path / "result.json"
    command = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--depth", "18", "--size", "128", "160",
               "--only", "inference", "--iters", "1", "--warmup", "0", "--inference-batches", "2",
               "--threads", "1", "--json", str(out), *extra]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {result["name"]: result for result in json.loads(out.read_text())["results"]}, completed


def test_trained_regime_and_compiled_row(tmp_path):
    rows, completed = run_benchmark(tmp_path, "--compile", "--compile-backend", "aot_eager")
    assert set(rows) == {"inference_batch2", "inference_channels_last_batch2", "inference_compiled_batch2"}
    pairs = rows["inference_batch2"]["pairs_per_image"]
    # the bias shift puts exactly TRAINED_PAIRS_PER_IMAGE of ours above the threshold; torchvision has
    # the same weights and shift, so it sees as many up to rounding
    assert pairs["ours"] == benchmark.TRAINED_PAIRS_PER_IMAGE
    assert abs(pairs["torchvision"] - pairs["ours"]) <= 0.1 * pairs["ours"]
    # deltas scaled as a trained detector's: no box clips to a line, so both keep the same detections
    detections = rows["inference_batch2"]["detections_per_image"]
    assert detections["ours"] == detections["torchvision"] == detections["ours_compiled"] > 10
    compiled = rows["inference_compiled_batch2"]
    assert len(compiled["compiled_first_calls_s"]) == benchmark.COMPILED_FIRST_CALLS
    assert compiled["ours_ms"] > 0 and "backend aot_eager" in compiled["note"]
    assert "inference_compiled_batch2" in completed.stdout


def test_dense_regime_without_a_compile_backend_on_the_cpu(tmp_path):
    rows, completed = run_benchmark(tmp_path, "--candidates", "dense", "--no-channels-last", "--compile")
    assert set(rows) == {"inference_dense_batch2"}  # the compiled path stays eager on the CPU: no row
    assert "skipped" in completed.stderr
    pairs = rows["inference_dense_batch2"]["pairs_per_image"]
    # 128x160 (a multiple of 32, configs/torchvision_r50_fpn.yaml's padding): P3-P7 grids 16x20, 8x10,
    # 4x5, 2x3 and 1x2; 9 anchors, 80 classes
    all_pairs = (16 * 20 + 8 * 10 + 4 * 5 + 2 * 3 + 1 * 2) * 9 * 80
    assert pairs["ours"] == pytest.approx(benchmark.DENSE_PAIR_FRACTION * all_pairs, abs=1)
