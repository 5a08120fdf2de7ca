"""Grounding DINO → SAM on tiny random models: prompt chunking, pruning, SAM plumbing, db build."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, SamModel, SamProcessor

from retclip.backbones import ColorBackbone
from retclip.database import FeatureDatabase
from retclip.database.build import build_database, items_from_labels_file
from retclip.database.captions import items_from_captions, label_synonyms
from retclip.errors import InputError, ModelUnavailableError
from retclip.images import SourceImage
from retclip.proposers import load_proposer
from retclip.proposers.grounded_sam import (
    GroundedSamProposer,
    GroundingDinoDetector,
    PromptChunk,
    assign_classes,
    chunk_prompts,
    image_pass_once,
)
from retclip.proposers.sam import SamSegmenter
from retclip.vocabulary import Vocabulary
from tiny_detectors import save_grounding_dino, save_sam

FAST = {"shortest_edge": 64, "longest_edge": 96, "min_area": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gsam")
    return {"gd": save_grounding_dino(root / "gd"), "sam": save_sam(root / "sam")}


def image(seed: int = 0, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_ade150_prompts_fit_the_token_limit_and_hold_every_class_once(tiny) -> None:
    tokenizer = BertTokenizer(str(tiny["gd"] / "vocab.txt"))
    names = Vocabulary.builtin("ade20k-150").names
    chunks = chunk_prompts(names, tokenizer, 256)
    assert len(chunks) > 1
    assert [i for c in chunks for i in c.classes] == list(range(150))
    for chunk in chunks:
        assert len(chunk.input_ids) <= 256
        assert tokenizer(chunk.text)["input_ids"] == list(chunk.input_ids)
        assert chunk.text == " . ".join(names[i].lower() for i in chunk.classes) + " ."
        for index, (start, end) in zip(chunk.classes, chunk.spans, strict=True):
            pieces = tokenizer.convert_ids_to_tokens(list(chunk.input_ids[start:end]))
            assert tokenizer.convert_tokens_to_string(pieces) == names[index].lower()
            assert chunk.input_ids[end] == tokenizer.convert_tokens_to_ids(".")


def test_a_class_longer_than_a_prompt_is_an_input_error(tiny) -> None:
    tokenizer = BertTokenizer(str(tiny["gd"] / "vocab.txt"))
    with pytest.raises(InputError, match="does not fit"):
        chunk_prompts(["cat", "x" * 40], tokenizer, 32)


def test_boxes_take_the_best_class_above_both_thresholds() -> None:
    # [CLS] cat . hot dog . [SEP]: class 4 = tokens 1, class 7 = tokens 3-4 (global indices)
    chunk = PromptChunk(
        "cat . hot dog .", (4, 7), (101, 1, 1012, 2, 3, 1012, 102), ((1, 2), (3, 5))
    )
    probs = torch.tensor(
        [
            [0.0, 0.9, 0.1, 0.2, 0.3, 0.0, 0.0],  # cat
            [0.0, 0.1, 0.0, 0.2, 0.8, 0.0, 0.0],  # hot dog (best token of the span)
            [0.0, 0.2, 0.1, 0.1, 0.1, 0.0, 0.0],  # below the box threshold
            [0.0, 0.2, 0.9, 0.2, 0.1, 0.0, 0.0],  # box passes on "." but no class passes text
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    probs = torch.cat([probs, torch.full((5, 3), 0.99)], dim=1)  # past the prompt: ignored
    keep, scores, labels = assign_classes(probs, chunk, box_threshold=0.3, text_threshold=0.25)
    assert keep.tolist() == [0, 1]
    assert labels.tolist() == [4, 7]
    np.testing.assert_allclose(scores.numpy(), [0.9, 0.8])


def test_classes_without_a_box_are_pruned(tiny) -> None:
    none = GroundedSamProposer(str(tiny["gd"]), str(tiny["sam"]), box_threshold=1.0, **FAST)
    empty = none.propose(SourceImage(image()), Vocabulary.from_string("cat, dog, car"))
    assert len(empty) == 0 and empty.kept_classes is not None and len(empty.kept_classes) == 0
    assert empty.masks.shape == (0, 48, 64) and empty.class_hints is not None

    some = GroundedSamProposer(
        str(tiny["gd"]), str(tiny["sam"]), box_threshold=0.0, text_threshold=0.0, **FAST
    )
    found = some.detector.detect(image(), ["cat", "dog", "car"])
    result = some.propose(SourceImage(image()), Vocabulary.from_string("cat, dog, car"))
    assert result.kept_classes is not None and result.class_hints is not None
    assert set(result.kept_classes.tolist()) == set(found.labels.tolist())
    assert set(result.class_hints.tolist()) <= set(result.kept_classes.tolist())
    assert len(result) >= 1 and result.masks.shape[1:] == (48, 64)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_sam_encodes_each_image_once_and_decodes_boxes_in_batches(tiny) -> None:
    proposer = GroundedSamProposer(
        str(tiny["gd"]),
        str(tiny["sam"]),
        box_threshold=0.0,
        text_threshold=0.0,
        nms_iou=1.0,
        mask_nms_iou=1.0,
        **FAST,
    )
    proposer.sam.prompt_batch = 16  # boxes of the 150 prompts fill several decoder batches
    encoder = count_calls(proposer.sam.model.vision_encoder)
    decoder = count_calls(proposer.sam.model.mask_decoder)
    detector = count_calls(proposer.detector.model)
    vocab = Vocabulary.builtin("ade20k-150")  # several prompts, one detector batch
    names = [entry.synonyms[0] for entry in vocab.classes]  # what the proposer prompts with
    result = proposer.propose(SourceImage(image(1)), vocab)
    boxes = len(proposer.detector.detect(image(1), names).boxes)
    assert boxes > proposer.sam.prompt_batch  # several decoder batches
    batches = -(-boxes // proposer.sam.prompt_batch)
    assert (encoder[0], decoder[0], detector[0]) == (1, batches, 2)
    assert len(result) <= boxes and result.masks.shape[1:] == (48, 64)


def test_box_masks_match_the_transformers_sam_pipeline(tiny) -> None:
    segmenter = SamSegmenter(str(tiny["sam"]), device="cpu")
    pixels = image(2, (40, 70))
    boxes = torch.tensor([[2.0, 3.0, 30.0, 35.0], [10.0, 0.0, 69.0, 20.0], [0.0, 0.0, 70.0, 40.0]])
    masks, _ = segmenter.segment_boxes(segmenter.embed(pixels), boxes)

    processor = SamProcessor.from_pretrained(tiny["sam"])
    model = SamModel.from_pretrained(tiny["sam"]).eval()
    inputs = processor(images=pixels, input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs, multimask_output=False)
    expected = processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0][:, 0]
    assert masks.shape == (3, 40, 70)
    agreement = (masks == expected).float().mean().item()
    assert agreement > 0.999


def test_the_image_backbone_runs_once_for_all_prompts_with_identical_detections(tiny) -> None:
    def detector(share: bool) -> GroundingDinoDetector:
        return GroundingDinoDetector(
            str(tiny["gd"]),
            box_threshold=0.0,
            text_threshold=0.0,
            shortest_edge=64,
            longest_edge=96,
            device="cpu",
            share_image_pass=share,
        )

    shared, reference = detector(True), detector(False)
    rows: dict[str, list[int]] = {"shared": [], "reference": []}
    for key, det in (("shared", shared), ("reference", reference)):
        swin = det.model.model.backbone.conv_encoder
        swin.register_forward_hook(lambda _m, args, _o, key=key: rows[key].append(len(args[0])))
    names = [entry.synonyms[0] for entry in Vocabulary.builtin("ade20k-150").classes]
    prompts = len(shared.prompts(names))
    assert prompts > 1
    for seed in (1, 2):
        ours, theirs = shared.detect(image(seed), names), reference.detect(image(seed), names)
        assert len(ours.boxes) > 0
        assert torch.equal(ours.boxes, theirs.boxes) and torch.equal(ours.labels, theirs.labels)
        assert torch.equal(ours.scores, theirs.scores)
    assert rows == {"shared": [1, 1], "reference": [prompts, prompts]}  # Swin rows per image


def test_image_pass_once_equals_the_full_forward(tiny) -> None:
    det = GroundingDinoDetector(str(tiny["gd"]), device="cpu")
    pixels = det.processor.image_processor(images=image(3), return_tensors="pt")
    ids = torch.tensor([[101, 210, 1012, 102, 0], [101, 211, 212, 1012, 102]])
    inputs = dict(
        pixel_values=pixels["pixel_values"].expand(2, -1, -1, -1),
        pixel_mask=pixels["pixel_mask"].expand(2, -1, -1),
        input_ids=ids,
        attention_mask=(ids > 0).long(),
        token_type_ids=torch.zeros_like(ids),
    )
    with torch.inference_mode():
        full = det.model(**inputs)
        with image_pass_once(det.model.model, 2):
            once = det.model(**inputs)
        again = det.model(**inputs)  # the hooks are gone after the block
    # equal up to float rounding: conv kernels (the extra level's 3x3 stride-2 projection) round
    # differently on 1 and on 2 rows, so transformers' own forward differs as much from itself
    # run on one row; the boxes above the thresholds are identical (test above)
    torch.testing.assert_close(once.logits, full.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(once.pred_boxes, full.pred_boxes, rtol=0, atol=1e-5)
    assert torch.equal(again.logits, full.logits)
    assert not det.model.model.backbone._forward_hooks


def test_missing_model_is_one_clear_error_at_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as caught:
        load_proposer("grounded-sam", detector="grounding-dino-tiny", device="cpu")
    assert time.monotonic() - start < 20
    message = str(caught.value)
    assert "IDEA-Research/grounding-dino-tiny" in message and "download" in message


def test_unknown_option_is_an_input_error() -> None:
    with pytest.raises(InputError, match="points_per_side"):
        load_proposer("grounded-sam", points_per_side=4)


def write_images(directory: Path, count: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        Image.fromarray(image(10 + i)).save(directory / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def check_rows(db: FeatureDatabase, expected: dict[str, set[str]]) -> None:
    """Every row is labelled with one of its own image's labels."""
    sources = db.provenance()["sources"]
    names = [label.name for label in db.labels]
    row_labels = [names[i] for i in db.label_ids()]
    assert len(row_labels) == len(sources) > 0
    for source, label in zip(sources, row_labels, strict=True):
        assert label in expected[str(source)]


def test_build_database_from_labels_and_from_captions(tiny, tmp_path) -> None:
    images = write_images(tmp_path / "images", 2)
    proposer = load_proposer(
        "grounded-sam",
        detector=str(tiny["gd"]),
        sam=str(tiny["sam"]),
        box_threshold=0.0,
        text_threshold=0.0,
        device="cpu",
        **FAST,
    )
    backbone = ColorBackbone()

    labels = {images[0]: ["cat", "dog"], images[1]: ["tree"]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    items = items_from_labels_file(tmp_path / "labels.json", tmp_path / "images")
    db = FeatureDatabase.create(
        tmp_path / "db1", fingerprint=backbone.fingerprint, dim=backbone.dim
    )
    report = build_database(db, backbone, proposer, items, build_id="l", progress=False)
    assert report.images == 2 and report.rows > 0
    check_rows(db, {str(tmp_path / "images" / k): set(v) for k, v in labels.items()})

    vocab = Vocabulary.from_string("cat, dog, tree, car")
    captions = [
        {"image": images[0], "caption": "Two cats and a dog on a cart."},
        {"image": images[1], "caption": "A tall tree."},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in captions))
    items = items_from_captions(tmp_path / "captions.jsonl", tmp_path / "images", vocab)
    assert [i.labels for i in items] == [("cat", "dog"), ("tree",)]
    db = FeatureDatabase.create(
        tmp_path / "db2", fingerprint=backbone.fingerprint, dim=backbone.dim
    )
    report = build_database(
        db, backbone, proposer, items, build_id="c", progress=False, synonyms=label_synonyms(vocab)
    )
    assert report.images == 2 and report.rows > 0
    check_rows(db, {item.source: set(item.labels) for item in items})
