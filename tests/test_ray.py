"""Database builds and evaluation on Ray (``--ray``): a distributed build equals the
single-process one row for row, on one machine and on a two-node cluster; a worker that dies is
retried without losing or duplicating an image; a killed build resumes to the same rows; the
evaluation's score cache is the one the single-process run writes, and it resumes."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
from click.testing import CliRunner, Result
from ray.cluster_utils import Cluster

import test_sources
from retclip.cli import cli
from retclip.database import FeatureDatabase
from retclip.database.build import BuildItem, build_database, items_from_dataset
from retclip.database.shards import read_completed
from retclip.database.sources import items_from_shards
from retclip.datasets import CocoPanopticDataset
from retclip.distributed import (
    RayCluster,
    RayShardMap,
    build_database_on_ray,
    ray_session,
    run_model_on_ray,
)
from retclip.evaluation.cache import ScoreCache
from retclip.evaluation.datasets import DatasetSpec, EvalDataset
from retclip.evaluation.loop import run_model
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter
from retclip.proposers.registry import PROPOSERS
from retclip.toyworld.dataset import toy_vocabulary
from retclip.vocabulary import Vocabulary
from test_sources import NamedColourProposer, three_samples, vocab_file, write_tar

# the factories below run on Ray workers, which cannot import the test modules
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(test_sources)

BATCH = 4
MiB = 1024**2


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    for split, n in (("db", 12), ("val", 3)):
        result = invoke("toyworld", "generate", "--out", root, "--split", split, "--n", n)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def spec(world: Path) -> ModelSpec:
    """The toy backbone with the world's ground-truth masks (the upper-bound database)."""
    return ModelSpec(
        backbone="toy", proposer="gt", gt_json=world / "panoptic_db.json", device="cpu"
    )


@pytest.fixture(scope="module")
def items(world: Path) -> list[BuildItem]:
    return items_of(world)


def single_process_build(path: Path, spec: ModelSpec, items: list[BuildItem]) -> FeatureDatabase:
    backbone, proposer = spec.load()
    assert proposer is not None
    db = FeatureDatabase.create(path, fingerprint=backbone.fingerprint, dim=backbone.dim)
    build_database(db, backbone, proposer, items, build_id="b", batch_size=BATCH, progress=False)
    return db


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spec: ModelSpec, items: list[BuildItem]) -> FeatureDatabase:
    return single_process_build(tmp_path_factory.mktemp("reference") / "db", spec, items)


def _register_test_proposer() -> None:
    """In every Ray worker: test_sources' class-prompted colour proposer as ``test-colour``."""
    from retclip.proposers.registry import PROPOSERS

    PROPOSERS["test-colour"] = lambda **_: NamedColourProposer()


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray with two CPUs for the module (starting one costs seconds)."""
    env = {"RETCLIP_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=300 * MiB,
        include_dashboard=False,
        logging_level="warning",
        runtime_env={"env_vars": env, "worker_process_setup_hook": _register_test_proposer},
    )
    yield
    ray.shutdown()


def assert_same_rows(db: FeatureDatabase, reference: FeatureDatabase) -> None:
    """Row for row the same features, labels and provenance, committed in the same batches (the
    build ids may differ: the command line derives its own). Features to the bit: a worker
    passes a commit batch through the models together, as the single process does."""
    assert len(db) == len(reference) > 0
    np.testing.assert_array_equal(db.features(), reference.features())
    names = lambda d: [d.labels[i].name for i in d.label_ids()]  # noqa: E731
    assert names(db) == names(reference)
    for key, values in reference.provenance().items():
        if key != "build_ids":
            np.testing.assert_array_equal(db.provenance()[key], values, err_msg=key)
    shards = lambda d: [  # noqa: E731
        (s["rows"], sorted(v for done in read_completed(d.path, s).values() for v in done))
        for s in d._meta["shards"]
    ]
    assert shards(db) == shards(reference)


def _dies_once(spec: ModelSpec, victim: str, marker: str):
    """The spec's models, whose proposer kills its worker process at ``victim`` the first time
    (``marker`` records that it did)."""
    backbone, proposer = spec.load()
    assert proposer is not None
    propose = proposer.propose

    def dying(image, vocabulary, text_embeddings=None):
        if image.source == victim and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        return propose(image, vocabulary, text_embeddings)

    proposer.propose = dying  # type: ignore[method-assign]
    return backbone, proposer


def test_a_build_on_a_local_ray_equals_the_single_process_build_though_a_worker_dies(
    local_ray, spec, items, reference, tmp_path
) -> None:
    """Two workers; one dies at image 5 (its process exits): Ray restarts it and retries its
    block, and the driver takes each image once."""
    marker = tmp_path / "died"
    factory = functools.partial(_dies_once, spec, items[5].source, str(marker))
    backbone, proposer = spec.load()
    assert proposer is not None
    db = FeatureDatabase.create(tmp_path / "db", fingerprint=backbone.fingerprint, dim=backbone.dim)
    report = build_database_on_ray(
        db, backbone, proposer, items, load_models=factory, cluster=RayCluster(workers=2),
        build_id="b", batch_size=BATCH, progress=False,
    )  # fmt: skip
    assert marker.exists()  # the worker did die
    assert report.images == len(items) and report.rows == len(reference) and not report.skipped
    assert_same_rows(FeatureDatabase.open(tmp_path / "db"), reference)


# `retclip db build`, killed (SIGKILL, the driver) right after its second commit
KILLED_CLI = textwrap.dedent(
    """
    import os, signal, sys
    import retclip.distributed as distributed
    from retclip.cli import main

    real = distributed.build_database_on_ray

    def killed_after_two_commits(*args, **kwargs):
        def die(committed):
            if committed == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, on_commit=die, **kwargs)

    distributed.build_database_on_ray = killed_after_two_commits
    main(sys.argv[1:])
    """
)


def test_a_build_killed_on_a_two_node_cluster_resumes_to_the_same_rows(
    local_ray, world, reference, tmp_path
) -> None:
    """``retclip db build --ray ADDRESS`` on two nodes of one CPU each, with two workers of one
    CPU each (a worker per node), killed after its second commit; run again (here, on the local
    Ray), it ends with the rows of the single-process build."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CLI)
    args = [
        "db", "build", tmp_path / "db", "--backbone", "toy",
        "--coco-panoptic", world / "panoptic_db.json", "--images", world / "images",
        "--batch-size", BATCH, "--device", "cpu", "--workers", 2, "--gpus-per-worker", 0,
    ]  # fmt: skip
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": 100 * MiB,
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * MiB)
        cluster.wait_for_nodes()
        command = [sys.executable, str(script), *map(str, args), "--ray", cluster.address]
        killed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        cluster.shutdown()
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = FeatureDatabase.open(tmp_path / "db")
    assert len(partial) and len(partial._meta["shards"]) == 2
    resumed = invoke(*args, "--ray")
    assert resumed.exit_code == 0, resumed.output
    done = len(items_of(world)) - 2 * BATCH
    assert f"from {done} images ({2 * BATCH} already in the database, skipped)" in resumed.output
    assert_same_rows(FeatureDatabase.open(tmp_path / "db"), reference)


def items_of(world: Path) -> list[BuildItem]:
    return items_from_dataset(CocoPanopticDataset(world / "panoptic_db.json", world / "images"))


def test_an_unreadable_image_is_one_error_line_after_the_batches_before_it(
    local_ray, world, tmp_path
) -> None:
    """As in one process: the batches before the bad image are committed, then one line names
    it (the worker's error travels back as a result)."""
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    bad = sorted((copy / "images").glob("db_*.png"))[5]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    result = invoke(
        "db", "build", tmp_path / "db", "--backbone", "toy",
        "--coco-panoptic", copy / "panoptic_db.json", "--images", copy / "images",
        "--batch-size", BATCH, "--device", "cpu", "--ray", "--workers", 1,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and bad.name in errors[0] and "Traceback" not in result.output
    db = FeatureDatabase.open(tmp_path / "db")
    (build_id,) = db.info()["build_ids"]
    assert len(db.completed_sources(build_id)) == BATCH


def test_shards_are_read_on_the_cluster_and_build_the_single_process_rows(
    local_ray, monkeypatch, tmp_path
) -> None:
    """``db build --shards ... --ray``: one Ray task per shard reads its headers and captions
    (the items are the single-process reader's, in the same order, also up to a limit), the
    workers read the images from the shards by offset, and the rows equal the single-process
    build's; a damaged shard is one error line naming it, with nothing built."""
    _register_test_proposer()  # in the driver too (monkeypatch undoes it)
    monkeypatch.setitem(PROPOSERS, "test-colour", PROPOSERS["test-colour"])
    for n in range(3):
        write_tar(tmp_path / "data" / f"{n:05d}.tar", three_samples(f"s{n}-"))
    pattern = str(tmp_path / "data" / "{00000..00002}.tar")
    vocabulary = Vocabulary.load(vocab_file(tmp_path))
    serial = items_from_shards([pattern], vocabulary)
    with ray_session(RayCluster()) as (session, _):
        lister = RayShardMap(session)
        assert items_from_shards([pattern], vocabulary, map_shards=lister) == serial
        assert lister.tasks == 3 and len(serial) == 9
        assert items_from_shards([pattern], vocabulary, limit=4, map_shards=lister) == serial[:4]

    def build(path: Path, *extra: object) -> Result:
        return invoke(
            "db", "build", path, "--shards", pattern, "--vocab", vocab_file(tmp_path),
            "--backbone", "color", "--proposer", "test-colour", "--batch-size", 2,
            "--commit-every", 4, *extra,
        )  # fmt: skip

    single, distributed = build(tmp_path / "single"), build(tmp_path / "ray", "--ray")
    assert single.exit_code == 0 and distributed.exit_code == 0, distributed.output
    one, other = FeatureDatabase.open(tmp_path / "single"), FeatureDatabase.open(tmp_path / "ray")
    assert_same_rows(other, one)  # in the same commits: 9 images, 2 batches each but the last
    completed = [read_completed(other.path, shard) for shard in other._meta["shards"]]
    assert [sum(map(len, done.values())) for done in completed] == [4, 4, 1]
    assert sorted(set(other.provenance()["sources"])) == sorted(i.source for i in serial)
    (tmp_path / "data" / "00001.tar").write_bytes(b"not a tar at all" * 64)
    broken = build(tmp_path / "broken", "--ray")
    assert broken.exit_code == 1, broken.output
    errors = [line for line in broken.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "00001.tar" in errors[0] and "Traceback" not in broken.output
    assert not (tmp_path / "broken").exists()


def test_eval_on_ray_writes_the_single_process_cache_and_resumes(
    local_ray, world, reference, tmp_path
) -> None:
    dataset = EvalDataset(
        DatasetSpec(
            kind="coco-panoptic",
            panoptic_json=str(world / "panoptic_val.json"),
            images=str(world / "images"),
        ).resolved()
    )
    model = ModelSpec(
        backbone="toy", proposer="gt", gt_json=world / "panoptic_val.json", device="cpu"
    )
    pipeline = PipelineSpec(model=model, db=reference.path)
    make_segmenter = functools.partial(build_segmenter, pipeline)
    vocabulary = toy_vocabulary()
    indices = list(range(len(dataset)))
    single, distributed = ScoreCache(tmp_path / "single"), ScoreCache(tmp_path / "ray")
    for cache in (single, distributed):
        cache.open({"model": pipeline.description()})
    run_model(dataset, indices, single, make_segmenter, vocabulary, progress=False)
    first = dataset.stem(0)
    distributed.path(first).write_bytes(single.path(first).read_bytes())  # as if resumed
    ran = run_model_on_ray(
        dataset, indices, distributed, make_segmenter, vocabulary,
        cluster=RayCluster(workers=1), progress=False,
    )  # fmt: skip
    assert ran == len(indices) - 1
    for index in indices:
        stem = dataset.stem(index)
        with np.load(single.path(stem)) as a, np.load(distributed.path(stem)) as b:
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{stem}: {key}")
    assert run_model_on_ray(
        dataset, indices, distributed, make_segmenter, vocabulary, cluster=RayCluster()
    ) == 0  # fmt: skip


def test_without_ray_the_option_is_one_error_line(monkeypatch, world, tmp_path) -> None:
    # the command line and the library import Ray only when --ray is given
    code = "import sys, retclip.cli, retclip.distributed; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    json_path, images = world / "panoptic_db.json", world / "images"
    args = ["--backbone", "toy", "--coco-panoptic", json_path, "--images", images]
    result = invoke("db", "build", tmp_path / "db", *args, "--ray")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[0]] and "pip install 'retclip[ray]'" in lines[0], result.output
    assert not (tmp_path / "db").exists()
    result = invoke("db", "build", tmp_path / "db", *args, "--workers", "2")
    assert result.exit_code == 1 and "need --ray" in result.output
