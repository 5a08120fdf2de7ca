"""Regression and sensitivity of the offline demo on the shipped toy model (CPU, one thread).

The numbers below are what `retclip demo` gives with the checkpoint in retclip/data/toy; they are
deterministic on CPU with OMP_NUM_THREADS=1. Planting a bug in mask pooling, L2 normalisation,
min-max normalisation or γ must move them outside the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import retclip.backbones.toy as toy_module
import retclip.scores.retrieval as retrieval_module
import retclip.segmenter as segmenter_module
from retclip.backbones import load_backbone
from retclip.cli import cli
from retclip.pooling import mask_pool
from retclip.toyworld.demo import run_demo

TOLERANCE = 0.05  # PQ points; one segment more or less moves PQ by far more
EXPECTED = {
    "gt": {
        "clip-only": {"PQ": 62.422, "SQ": 92.857, "RQ": 62.422, "mIoU": 56.014, "mAP": 52.914},
        "retrieval-only": {"PQ": 67.663, "SQ": 99.875, "RQ": 67.787, "mIoU": 62.726, "mAP": 47.963},
        "retclip": {"PQ": 63.358, "SQ": 92.857, "RQ": 63.358, "mIoU": 58.171, "mAP": 59.405},
        "retclip-tuned": {"PQ": 66.924, "SQ": 92.723, "RQ": 67.052, "mIoU": 63.392, "mAP": 57.82},
    },
    "regions": {
        "clip-only": {"PQ": 30.748, "SQ": 65.065, "RQ": 36.436, "mIoU": 37.393, "mAP": 20.274},
        "retrieval-only": {"PQ": 38.463, "SQ": 84.21, "RQ": 45.4, "mIoU": 45.531, "mAP": 18.115},
        "retclip": {"PQ": 34.451, "SQ": 76.749, "RQ": 41.052, "mIoU": 40.962, "mAP": 24.874},
        "retclip-tuned": {"PQ": 39.004, "SQ": 83.837, "RQ": 46.365, "mIoU": 46.447, "mAP": 25.543},
    },
}
SMALL = {
    "n_db": 120,
    "n_val": 16,
    "n_tune": 10,
}  # for the planted bugs: enough to see them, quick to run


def close(a: dict, b: dict) -> bool:
    return all(abs(a[p][s][k] - b[p][s][k]) <= TOLERANCE for p in b for s in b[p] for k in b[p][s])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(cli, ["demo", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "metrics.json").read_text())


def test_demo_reproduces_the_recorded_numbers(demo) -> None:
    out, metrics = demo
    assert close(metrics, EXPECTED), json.dumps({p: metrics[p] for p in EXPECTED})
    for name in ("figure.png", "gamma_curve.png"):
        assert (out / name).stat().st_size > 10_000
    overlays = list((out / "overlays").rglob("*.png"))
    assert len(overlays) == 2 * 4 * 4  # proposers × settings × images in the figure


def test_retclip_beats_clip_only_and_the_paper_ordering_holds_for_predicted_masks(demo) -> None:
    _, metrics = demo
    for proposer in ("gt", "regions"):
        pq = {setting: values["PQ"] for setting, values in metrics[proposer].items()}
        assert pq["retclip-tuned"] > pq["retclip"] > pq["clip-only"]
        assert pq["retrieval-only"] > pq["clip-only"]  # retrieval is robust to the masking shift
    regions = {setting: values["PQ"] for setting, values in metrics["regions"].items()}
    assert regions["retclip-tuned"] > regions["retrieval-only"] > regions["clip-only"]
    curve = metrics["gamma_curve"]
    assert len(curve["gamma"]) == len(curve["gt"]) == len(curve["tuning (gt)"]) == 11
    tuned = metrics["settings"]["retclip-tuned"]["gamma"]
    assert curve["tuning (gt)"][curve["gamma"].index(tuned)] == max(curve["tuning (gt)"])


def test_a_rerun_uses_the_cache(demo, monkeypatch) -> None:
    out, metrics = demo

    def no_model(*args, **kwargs):
        raise AssertionError("the rerun ran the model")

    monkeypatch.setattr(toy_module.ToyBackbone, "encode_images", no_model)
    again = run_demo(out, backbone=load_backbone("toy"), figures=False, progress=False, log=len)
    assert close(again, {p: metrics[p] for p in EXPECTED})


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("small")
    return run_demo(out, backbone=load_backbone("toy"), figures=False, progress=False, **SMALL)


def planted(monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    if bug == "mask pooling ignores the mask":

        def pool_everything(dense, masks, *, mode="soft", normalize=True):
            return mask_pool(dense, torch.ones_like(masks), mode=mode, normalize=normalize)

        monkeypatch.setattr(toy_module, "mask_pool", pool_everything)
    elif bug == "no L2 normalisation":
        monkeypatch.setattr(torch.nn.functional, "normalize", lambda x, *a, **k: x)
    elif bug == "no min-max normalisation":

        def raw_similarity(similarities, votes):
            scores = torch.where(torch.isfinite(similarities), similarities, 0.0)
            return torch.where(votes, scores.unsqueeze(-1), 0.0).amax(1)

        monkeypatch.setattr(retrieval_module, "scores_from_votes", raw_similarity)
    elif bug == "gamma swapped":
        original_ensemble = segmenter_module.ensemble

        def swapped(*args, gamma, **kwargs):
            return original_ensemble(*args, gamma=1.0 - gamma, **kwargs)

        monkeypatch.setattr(segmenter_module, "ensemble", swapped)


@pytest.mark.parametrize(
    "bug",
    [
        "mask pooling ignores the mask",
        "no L2 normalisation",
        "no min-max normalisation",
        "gamma swapped",
    ],
)
def test_planted_bugs_move_the_numbers(bug, small_reference, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RETCLIP_CACHE_DIR", str(tmp_path / "text-cache"))
    planted(monkeypatch, bug)
    broken = run_demo(
        tmp_path, backbone=load_backbone("toy"), figures=False, progress=False, **SMALL
    )
    assert not close(broken, {p: small_reference[p] for p in EXPECTED}), bug
