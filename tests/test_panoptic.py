"""Panoptic, semantic and instance post-processing against literal Mask2Former loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retclip.panoptic import (
    instance_inference,
    panoptic_inference,
    postprocess,
    semantic_inference,
    semantic_void_value,
)


def reference_panoptic(probs, masks, isthing, score_threshold, overlap_threshold, void_class):
    """Mask2Former's ``panoptic_inference`` loop, written out literally (pixels per proposal)."""
    scores, labels = probs.max(-1)
    keep = scores > score_threshold
    if void_class is not None:
        keep &= labels != void_class
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    cur_index = torch.nonzero(keep).flatten()
    h, w = masks.shape[1:]
    panoptic = torch.zeros((h, w), dtype=torch.int32)
    segments = []
    if cur_masks.shape[0] == 0:
        return panoptic.numpy(), segments
    cur_mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    stuff_memory: dict[int, int] = {}
    current_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = cur_classes[k].item()
        thing = bool(isthing[pred_class])
        mask_area = (cur_mask_ids == k).sum().item()
        original_area = (cur_masks[k] >= 0.5).sum().item()
        mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not thing:
                if pred_class in stuff_memory:
                    panoptic[mask] = stuff_memory[pred_class]
                    continue
                stuff_memory[pred_class] = current_id + 1
            current_id += 1
            panoptic[mask] = current_id
            segments.append(
                {
                    "id": current_id,
                    "category": pred_class,
                    "isthing": thing,
                    "score": cur_scores[k].item(),
                    "mask_index": cur_index[k].item(),
                }
            )
    return panoptic.numpy(), segments


def check_against_reference(probs, masks, isthing, score_threshold, overlap_threshold, void_class):
    ref_map, ref_segments = reference_panoptic(
        probs, masks, isthing, score_threshold, overlap_threshold, void_class
    )
    pan, segments = panoptic_inference(
        probs,
        masks,
        isthing,
        score_threshold=score_threshold,
        overlap_threshold=overlap_threshold,
        void_class=void_class,
    )
    assert pan.dtype == np.int32
    np.testing.assert_array_equal(pan, ref_map)
    assert [(s.id, s.category, s.isthing, s.mask_index) for s in segments] == [
        (r["id"], r["category"], r["isthing"], r["mask_index"]) for r in ref_segments
    ]
    for s, r in zip(segments, ref_segments, strict=True):
        assert s.score == pytest.approx(r["score"])
        ys, xs = np.nonzero(ref_map == s.id)
        assert s.area == ys.size > 0
        assert s.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    return segments


@pytest.mark.parametrize("overlap_threshold", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(12))
def test_panoptic_matches_literal_loop(seed, overlap_threshold):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = 2 + seed % 7, 3 + seed % 4, 9 + seed % 5, 11 + seed % 3
    probs = torch.softmax(3 * torch.randn(n, c, generator=gen), -1)
    # Coarse blobs: smooth-ish masks with real overlaps, plus some exact ties.
    masks = torch.sigmoid(
        4 * torch.nn.functional.interpolate(torch.randn(1, n, 3, 3, generator=gen), (h, w))[0]
    )
    if seed % 3 == 0:
        masks = (masks * 4).round() / 4  # quantised: many score×mask ties between proposals
        probs[: n // 2] = probs[0]  # identical classes/scores for several proposals
    isthing = (torch.arange(c) % 2 == 0).numpy()
    void_class = c - 1 if seed % 2 else None
    score_threshold = 0.0 if seed % 4 < 2 else 0.4
    check_against_reference(probs, masks, isthing, score_threshold, overlap_threshold, void_class)


def test_panoptic_random_cases_produce_segments():
    # Guard against a vacuous equivalence test: relaxed thresholds must yield stuff and things.
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(8, 4, generator=gen), -1)
    masks = torch.sigmoid(4 * torch.randn(8, 10, 10, generator=gen))
    segments = check_against_reference(probs, masks, [True, False, True, False], 0.0, 0.0, None)
    assert {s.isthing for s in segments} == {True, False}


def test_two_overlapping_things():
    masks = torch.zeros(2, 6, 8)
    masks[0, 1:5, 0:5] = 0.9  # 20 px
    masks[1, 1:5, 3:8] = 0.8  # 20 px, overlaps 8 px with the first
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    pan, segments = panoptic_inference(probs, masks, [True, False], overlap_threshold=0.5)
    # Query 0 (0.9·0.9) beats query 1 (0.6·0.8) on the overlap: it keeps 20 px, the other 12.
    assert [(s.id, s.category, s.area, s.mask_index) for s in segments] == [
        (1, 0, 20, 0),
        (2, 0, 12, 1),
    ]
    assert segments[0].bbox == (0.0, 1.0, 5.0, 4.0)
    assert segments[1].bbox == (5.0, 1.0, 3.0, 4.0)
    assert segments[1].score == pytest.approx(0.6)
    assert (pan == 0).sum() == 48 - 32
    # 12 / 20 = 0.6 < 0.8: the occluded instance is dropped.
    pan, segments = panoptic_inference(probs, masks, [True, False], overlap_threshold=0.8)
    assert [s.mask_index for s in segments] == [0]
    assert set(np.unique(pan)) == {0, 1}


def test_stuff_of_one_class_merges():
    masks = torch.zeros(3, 4, 6)
    masks[0, :, :2] = 1.0
    masks[1, :, 4:] = 1.0
    masks[2, :, 2:4] = 1.0
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.05, 0.9, 0.05], [0.1, 0.1, 0.8]])
    pan, segments = panoptic_inference(probs, masks, [True, False, False])
    assert [(s.id, s.category, s.isthing, s.area) for s in segments] == [
        (1, 1, False, 16),
        (2, 2, False, 8),
    ]
    assert segments[0].score == pytest.approx(0.7)  # the first proposal's score is kept
    assert segments[0].mask_index == 0
    assert segments[0].bbox == (0.0, 0.0, 6.0, 4.0)  # box of the merged pixels
    np.testing.assert_array_equal(pan[0], [1, 1, 2, 2, 1, 1])
    # Things of one class are not merged.
    _, segments = panoptic_inference(probs, masks, [True, True, True])
    assert [s.id for s in segments] == [1, 2, 3]


def test_void_class_and_score_threshold():
    masks = torch.ones(3, 2, 2)
    masks[1] = 0.0
    masks[1, 0, 0] = 0.9
    probs = torch.tensor([[0.2, 0.1, 0.7], [0.5, 0.3, 0.2], [0.3, 0.35, 0.35]])
    # Proposal 0 is void; proposal 2's label is the first maximum (class 1); it wins 3 of its 4 px.
    pan, segments = panoptic_inference(
        probs, masks, [True, True], void_class=2, overlap_threshold=0.7
    )
    assert [(s.mask_index, s.category) for s in segments] == [(1, 0), (2, 1)]
    assert pan.tolist() == [[1, 2], [2, 2]]
    # Without the void class, proposal 0 (score 0.7) wins everywhere.
    pan, segments = panoptic_inference(probs, masks, [True, True, True])
    assert [s.mask_index for s in segments] == [0]
    # The score threshold is strict: 0.35 drops proposal 2.
    _, segments = panoptic_inference(
        probs, masks, [True, True], void_class=2, score_threshold=0.34, overlap_threshold=0.7
    )
    assert [s.mask_index for s in segments] == [1, 2]
    _, segments = panoptic_inference(
        probs, masks, [True, True], void_class=2, score_threshold=0.35, overlap_threshold=0.7
    )
    assert [s.mask_index for s in segments] == [1]
    _, segments = panoptic_inference(probs, masks, [True, True], void_class=2)
    assert [s.mask_index for s in segments] == [1]  # 3/4 < 0.8 drops proposal 2
    pan, segments = panoptic_inference(
        probs, masks, [True, True], void_class=2, score_threshold=0.9
    )
    assert segments == [] and not pan.any()


def test_no_proposals():
    probs, masks = torch.zeros(0, 5), torch.zeros(0, 3, 4)
    pred = postprocess(probs, masks, [True] * 5)
    assert pred.panoptic.shape == (3, 4) and not pred.panoptic.any()
    assert pred.segments == [] and pred.instances == []
    assert (pred.semantic == 255).all() and pred.semantic.dtype == np.int32


def test_semantic_matches_numpy():
    rng = np.random.default_rng(1)
    probs = rng.random((6, 4)).astype(np.float32)
    masks = rng.random((6, 5, 7)).astype(np.float32)
    masks[:, 0, 0] = 0.0  # covered by no mask → void
    got = semantic_inference(torch.from_numpy(probs), torch.from_numpy(masks))
    expected = np.tensordot(probs, masks, axes=([0], [0])).argmax(0)
    expected[0, 0] = 255
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.int32
    got_void = semantic_inference(torch.from_numpy(probs), torch.from_numpy(masks), void_class=0)
    expected_void = np.tensordot(probs[:, 1:], masks, axes=([0], [0])).argmax(0) + 1
    expected_void[0, 0] = 255
    np.testing.assert_array_equal(got_void, expected_void)


def test_semantic_void_value_for_large_vocabularies():
    assert semantic_void_value(150) == 255
    assert semantic_void_value(255) == 65535
    probs = torch.zeros(1, 300)
    probs[0, 280] = 1.0
    masks = torch.zeros(1, 2, 2)
    masks[0, 0] = 1.0
    sem = semantic_inference(probs, masks)
    assert sem.tolist() == [[280, 280], [65535, 65535]]


def test_instance_scores_by_hand():
    masks = torch.zeros(2, 2, 2)
    masks[0] = torch.tensor([[0.9, 0.7], [0.2, 0.5]])  # inside (> 0.5): 0.9, 0.7 → mean 0.8
    masks[1] = torch.tensor([[0.6, 0.0], [0.0, 0.0]])  # mean 0.6
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    instances = instance_inference(probs, masks, [True, True, False], max_instances=6)
    got = [(i.mask_index, i.category, round(i.score, 5)) for i in instances]
    assert got == [(0, 0, 0.4), (0, 1, 0.24), (1, 0, 0.06), (1, 1, 0.06)]
    # Top-k is taken before stuff classes are dropped: the top 2 are (1, 2) stuff and (0, 0).
    instances = instance_inference(probs, masks, [True, True, False], max_instances=2)
    assert [(i.mask_index, i.category) for i in instances] == [(0, 0)]
    # An empty mask scores 0 rather than NaN.
    instances = instance_inference(probs, torch.zeros(2, 2, 2), [True, True, True])
    assert all(i.score == 0.0 for i in instances) and len(instances) == 6


def test_instance_cap_and_order():
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(30, 10, generator=gen), -1)
    masks = torch.rand(30, 8, 8, generator=gen)
    instances = instance_inference(probs, masks, [True] * 10, max_instances=25)
    assert len(instances) == 25
    scores = [i.score for i in instances]
    assert scores == sorted(scores, reverse=True)
    kept = {(i.mask_index, i.category) for i in instances}
    top = probs.flatten().topk(25).indices
    assert kept == {(int(t) // 10, int(t) % 10) for t in top}
    # k never exceeds N·C, and void is never selected.
    instances = instance_inference(probs[:2, :3], masks[:2], [True] * 3, void_class=2)
    assert len(instances) == 4 and all(i.category != 2 for i in instances)


def test_postprocess_bundles_results():
    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(5, 3, generator=gen), -1)
    masks = torch.rand(5, 6, 6, generator=gen)
    pred = postprocess(probs, masks, [True, False, True], overlap_threshold=0.0)
    pan, segments = panoptic_inference(probs, masks, [True, False, True], overlap_threshold=0.0)
    np.testing.assert_array_equal(pred.panoptic, pan)
    assert pred.segments == segments
    assert pred.isthing is not None and pred.isthing.tolist() == [True, False, True]
    assert all(pred.isthing[i.category] for i in pred.instances)
    with pytest.raises(ValueError, match="isthing"):
        postprocess(probs, masks, [True, False])
