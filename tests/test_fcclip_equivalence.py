"""Ours against the original FC-CLIP (detectron2) on the same random weights and input.

The fixtures (``tests/fixtures/fcclip``, produced as its README says) hold a reduced FC-CLIP's
state dict under the original's key names, the input image and text classifier, and the
original's outputs: mask logits, in-vocabulary logits, the semantic map, the panoptic result
(overlap threshold relaxed to 0) and the instance scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from retclip.fcclip.checkpoint import load_fcclip_weights
from retclip.fcclip.model import FCCLIP, FCCLIPConfig, masks_to_image, preprocess
from retclip.panoptic import postprocess
from retclip.text_embeddings import ClassEmbeddings
from tiny_models import save_tiny_open_clip_convnext

FIXTURES = Path(__file__).parent / "fixtures" / "fcclip"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    clip_dir = save_tiny_open_clip_convnext(tmp_path_factory.mktemp("fx") / "clip")
    clip = open_clip.create_model(f"local-dir:{clip_dir}").eval()
    model = FCCLIP(FCCLIPConfig.reduced((8, 16, 24, 32), 16), clip).eval()
    report = load_fcclip_weights(
        model, load_file(str(FIXTURES / "fcclip_reduced_state.safetensors")), backbone="load"
    )
    assert report.ok and report.ignored == ["criterion.empty_weight"]
    data = dict(np.load(FIXTURES / "fcclip_reduced_io.npz"))
    text = ClassEmbeddings(
        torch.from_numpy(data["text"]),
        torch.from_numpy(data["synonym_class"]),
        int(data["synonym_class"].max()) + 1,
    )
    pixels, resized = preprocess(data["image"], None)
    with torch.no_grad():
        out = model(pixels, text)
    return model, out, data, resized


def test_mask_logits_and_in_vocabulary_logits_match(run) -> None:
    _, out, data, _ = run
    np.testing.assert_allclose(
        out.mask_logits[0].numpy(), data["mask_logits"], atol=5e-5, rtol=1e-4
    )
    np.testing.assert_allclose(
        out.in_vocab_logits[0].numpy(), data["in_vocab_logits"], atol=5e-5, rtol=1e-4
    )


def test_ensembled_probabilities_and_results_match(run) -> None:
    model, out, data, resized = run
    seen = torch.from_numpy(data["seen"])
    probs = model.class_probs(out, seen)[0]
    probs = torch.log(probs + 1e-8).softmax(-1)  # the original re-softmaxes log-probabilities
    h, w = data["image"].shape[:2]
    masks = masks_to_image(out.mask_logits, resized, (h, w))[0].sigmoid()
    semantic = torch.einsum("qc,qhw->chw", probs[:, :-1], masks)
    np.testing.assert_allclose(semantic.numpy(), data["sem_seg"], atol=1e-5, rtol=1e-4)
    isthing = np.array([True, False, True, True, False])
    result = postprocess(
        probs,
        masks,
        isthing,
        score_threshold=0.0,
        overlap_threshold=0.0,
        void_class=5,
        max_instances=20,
    )
    np.testing.assert_array_equal(result.panoptic, data["panoptic"])
    expected = json.loads(str(data["segments"]))
    assert [(s.id, s.category, s.isthing) for s in result.segments] == [
        (s["id"], s["category_id"], s["isthing"]) for s in expected
    ]
    np.testing.assert_allclose(
        sorted(i.score for i in result.instances), sorted(data["inst_scores"]), atol=1e-5
    )


def test_out_of_vocabulary_path_matches_through_the_ensemble(run) -> None:
    model, out, data, _ = run
    # the ensemble uses the out-of-vocabulary logits; a wrong path changes the semantic map
    seen = torch.from_numpy(data["seen"])
    swapped = model.class_probs(
        type(out)(
            out.mask_logits,
            out.in_vocab_logits,
            out.in_vocab_logits,
            out.valid,
            out.clip_embeddings,
        ),
        seen,
    )
    assert not torch.allclose(swapped, model.class_probs(out, seen), atol=1e-4)
    assert F.normalize(out.out_vocab_logits, dim=-1).isfinite().all()
