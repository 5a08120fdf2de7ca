"""The benchmark scripts run end to end on tiny models (timings are printed, never asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    bench_build,
    bench_end_to_end,
    bench_retrieval,
    bench_segment_features,
    bench_segment_latency,
)


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    models = tmp_path_factory.mktemp("bench-models")
    return ["--size", "tiny", "--models-dir", str(models), "--repeats", "1", "--no-save"]


def test_retrieval(tiny_args: list[str]) -> None:
    specs = ["flat", "ivf-flat:nprobe=4", "ivf-pq:pq_m=8,pq_bits=4", "hnsw", "auto"]
    text = bench_retrieval.main([*tiny_args, "--rows", "600", "--queries", "20", "--specs", *specs])
    assert "recall@10" in text
    assert text.count("| 600 |") == 1 + len(specs)


def test_segment_features(tiny_args: list[str]) -> None:
    text = bench_segment_features.main(
        [*tiny_args, "--masks", "2", "5", "--resolutions", "32", "--image-size", "48", "64"]
    )
    assert "speed-up" in text and "| 32 | 5 |" in text


def test_end_to_end(tiny_args: list[str]) -> None:
    text = bench_end_to_end.main(
        [*tiny_args, "--images", "1", "--boxes", "2", "--classes", "2", "--image-size", "48", "64"]
    )
    assert "naive" in text and "speed-up" in text


def test_build(tiny_args: list[str]) -> None:
    text = bench_build.main(
        [*tiny_args, "--images", "2", "--boxes", "2", "--image-size", "48", "64"]
    )
    assert "index add" in text and "images/s" in text


def test_segment_latency(tiny_args: list[str]) -> None:
    argv = [*tiny_args, "--backbones", "clip-b16", "convnext-l", "--thread-counts", "1",
            "--boxes", "2", "--db-rows", "50", "--image-size", "48", "64"]  # fmt: skip
    text = bench_segment_latency.main(argv)
    assert "not forward %" in text and "convnext-l" in text


def test_results_written(tmp_path: Path) -> None:
    from bench.common import interleaved, markdown_table, report

    times = interleaved({"a": lambda: None, "b": lambda: None}, 3)
    assert [len(v) for v in times.values()] == [3, 3]
    out = tmp_path / "RESULTS.md"
    report("t", [markdown_table(["x"], [[1.5]])], results=out)
    report("u", [markdown_table(["x"], [[2]])], results=out)
    text = out.read_text()
    assert "## t" in text and "## u" in text and "OMP_NUM_THREADS" in text
