"""The benchmark scripts run end to end on tiny models (timings are printed, never asserted)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import (
    bench_build,
    bench_detector_prompts,
    bench_end_to_end,
    bench_fcclip_forward,
    bench_grounded_sam,
    bench_mask_tier,
    bench_retrieval,
    bench_segment_features,
    bench_segment_latency,
    gpu_check,
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


def test_detector_prompts(tiny_args: list[str]) -> None:
    argv = [*tiny_args, "--classes", "150", "--image-size", "48", "64", "--shortest-edge", "64",
            "--longest-edge", "96"]  # fmt: skip
    text = bench_detector_prompts.main(argv)
    assert "| shared |" in text and "identical: True" in text


def test_mask_tier(tiny_args: list[str]) -> None:
    text = bench_mask_tier.main([*tiny_args, "--boxes", "2", "--image-size", "48", "64"])
    assert "| edgetam |" in text and "| sam2.1-tiny |" in text


def test_gpu_check_python_part_on_cpu(tiny_args: list[str]) -> None:
    text = gpu_check.main([*tiny_args, "--quick", "--images", "2"])
    paths = [path for path in gpu_check.PATHS if path != "fcclip"]  # real-size head only
    for path in paths:
        for precision in ("fp32", "bf16"):
            for batch in (1, 4):
                assert f"| {path} | float32 | {precision} | {batch} |" in text
    assert text.count("| db build | float32 |") == 8  # the images/s and the stage tables


def test_gpu_check_sh_dry_run_parses_and_runs_without_a_gpu(tmp_path: Path) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    run = subprocess.run(
        ["bash", str(script), "--quick", "--no-save", "--paths", "db build", "--models-dir",
         str(tmp_path), "--batch-sizes", "1", "--precisions", "fp32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| db build | float32 | fp32 | 1 |" in run.stdout


def test_gpu_check_refuses_to_start_without_cuda() -> None:
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run([str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2 and "no CUDA device" in run.stderr, run.stderr


def test_gpu_check_names_an_interpreter_without_the_project() -> None:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": "false"}  # an "interpreter" that imports nothing
    run = subprocess.run([str(script), "--quick"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "false cannot import torch and retclip" in run.stderr


def test_index_scale_quick() -> None:
    from bench import index_scale

    text = index_scale.main(["--quick", "--no-save"])
    table = [line for line in text.splitlines() if line.startswith("| 10000 |")]
    assert len(table) == 1 + len(index_scale.DEFAULT_SPECS)  # exact, auto and two alternatives
    assert "auto:memory_gb=" in table[1] and "ondisk=1" in table[3]
    recalls = [float(line.split("|")[10]) for line in table[1:]]
    assert all(0 < recall <= 1 for recall in recalls)
    assert "| 1,000,000,000 |" in text  # the projection


def test_index_scale_reuses_lists_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With IVF at the quick size, the alternatives are built into auto's lists; --keep makes
    a rerun take every measurement from the folder instead of building again."""
    from bench import index_scale

    from retclip.database import index as index_module

    monkeypatch.setattr(index_module, "AUTO_EXACT_MAX_ROWS", 5000)  # auto: IVF at 10k rows
    first = index_scale.main(["--quick", "--no-save", "--keep", str(tmp_path)])
    table = [line.split("|") for line in first.splitlines() if line.startswith("| 10000 |")]
    assert [cells[4].strip() for cells in table[1:]] == ["own", "reused", "reused"]
    assert "IVF64," in table[1][3]  # lists capped by the tiny memory budget
    assert "measured before" not in capsys.readouterr().out
    again = index_scale.main(["--quick", "--no-save", "--keep", str(tmp_path)])
    assert capsys.readouterr().out.count("measured before") == len(index_scale.DEFAULT_SPECS)
    rows = [line.split("|")[4:] for line in again.splitlines() if line.startswith("| 10000 |")]
    assert rows == [cells[4:] for cells in table]  # the same measurements
    # the size's record, reported without building: the same table and projection
    replayed = index_scale.main(["--no-save", "--measured", str(tmp_path / "measured-10000.json")])
    assert "measured before" not in capsys.readouterr().out
    assert [line for line in replayed.splitlines() if line.startswith("| ")] == [
        line for line in first.splitlines() if line.startswith("| ")
    ]


def test_index_scale_recorded_10m_run() -> None:
    """The committed record of the 10M-row run reports its table and the projection from it."""
    from bench import index_scale

    record = Path(index_scale.__file__).parent / "measured" / "index_scale_10m.json"
    text = index_scale.main(["--no-save", "--measured", str(record)])
    assert "| 10000000 | auto:memory_gb=8.0 | factory:IVF32768_HNSW32,SQ8," in text
    assert "| 100,000,000 | auto:memory_gb=80.0 | factory:IVF262144_HNSW32,SQ8," in text
    assert "| 1,000,000,000 | auto:memory_gb=800.0 | factory:IVF1048576_HNSW32,SQ8," in text


def test_index_scale_bad_record(tmp_path: Path) -> None:
    from bench import index_scale

    broken = tmp_path / "measured-10.json"
    broken.write_text('{"rows": 10, "dim": 4, "results": []}')
    with pytest.raises(SystemExit, match=r"measured-10.json is not an index_scale record: missing"):
        index_scale.main(["--no-save", "--measured", str(broken)])
    fields = '"dim": 4, "memory_gb": 1, "threads": 1, "exact_qps": 1'
    broken.write_text('{"rows": 10, ' + fields + ', "results": {"spec": "flat"}}')
    with pytest.raises(SystemExit, match=r"missing results \(a list of objects\)"):
        index_scale.main(["--no-save", "--measured", str(broken)])
    broken.write_text("{")
    with pytest.raises(SystemExit, match="cannot read the measurements"):
        index_scale.main(["--no-save", "--measured", str(broken)])


def test_throughput_quick() -> None:
    from bench import bench_throughput

    text = bench_throughput.main(["--quick", "--no-save"])
    for run in ("db build, batch 1", "db build, batch 4", "db build, batch 2", "segment, batch 2"):
        assert f"| {run} |" in text
    assert text.count("| 1 |") >= 3  # each table's batch-1 baseline


def test_rows(tiny_args: list[str]) -> None:
    from bench import bench_rows

    argv = [*tiny_args, "--rows", "gt-clip-b16", "gdino-sam-clip-b16", "--image-size", "48", "64"]
    text = bench_rows.main([*argv, "--db-rows", "200", "--boxes", "3", "--gt-masks", "4"])
    assert "| gt-clip-b16 |" in text and "| gdino-sam-clip-b16 |" in text


def test_grounded_sam(tiny_args: list[str]) -> None:
    text = bench_grounded_sam.main([*tiny_args, "--quick", "--classes", "8", "150", "--boxes", "3"])
    assert "| 8 | 1 | 3 |" in text and "| 150 | 5 | 3 |" in text
    assert "3 vs 3 masks" in text and "| 150 | retclip |" in text


def test_fcclip_forward_retclip_side() -> None:
    # without the original FC-CLIP: retclip's side on the fixture's reduced model
    text = bench_fcclip_forward.main(["--quick", "--no-save"])
    assert "| retclip segment --proposer fcclip |" in text and "the original is absent" in text


def test_fcclip_forward_needs_the_original(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_fcclip_forward.main(["--no-save"]) == ""
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "bench_fcclip_forward: the original FC-CLIP is missing: pass --fcclip-python (the FC-CLIP "
        "venv's python) and --fcclip-root (fc-clip)"
    ]


@pytest.mark.skipif(
    not os.environ.get("RETCLIP_FCCLIP_PYTHON") or not os.environ.get("RETCLIP_FCCLIP_ROOT"),
    reason="the original FC-CLIP: set RETCLIP_FCCLIP_PYTHON (its venv's python) and "
    "RETCLIP_FCCLIP_ROOT (the fc-clip checkout)",
)
def test_fcclip_forward_against_the_original() -> None:
    argv = ["--quick", "--no-save", "--fcclip-python", os.environ["RETCLIP_FCCLIP_PYTHON"],
            "--fcclip-root", os.environ["RETCLIP_FCCLIP_ROOT"]]  # fmt: skip
    text = bench_fcclip_forward.main(argv)
    assert "| FC-CLIP forward (original) |" in text and "target ≤ 1.05×" in text
    assert '"keys": 206' in text  # the original's full state dict, loaded by retclip


def test_ray_build_commit_table_quick() -> None:
    from bench import ray_build

    text = ray_build.main(["--commit-only", "--quick", "--no-save"])
    assert "| 2 | 200 | 2 |" in text and "resume read s" in text and "| 2 | 10 | 20 |" in text
