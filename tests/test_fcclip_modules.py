"""FC-CLIP's modules, each against an independent formulation (no detectron2 needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from retclip.backbones.open_clip_convnext import OpenClipBackbone
from retclip.errors import InputError
from retclip.fcclip.checkpoint import (
    CheckpointError,
    convert_fcclip,
    head_shapes,
    load_converted,
    load_fcclip_weights,
    map_key,
)
from retclip.fcclip.deformable_attention import MSDeformAttn, ms_deform_attn_sample
from retclip.fcclip.model import (
    CONVNEXT_LARGE,
    FCCLIP,
    FCCLIPConfig,
    geometric_ensemble,
    masks_to_image,
    preprocess,
    resize_size,
)
from retclip.fcclip.pixel_decoder import sine_position_embedding
from retclip.fcclip.proposer import FcclipProposer
from retclip.fcclip.transformer_decoder import DecoderLayer, TransformerDecoder, mask_pool
from retclip.images import SourceImage
from retclip.proposers.registry import PROPOSERS
from retclip.segmenter import Segmenter
from retclip.text_embeddings import ClassEmbeddings
from retclip.vocabulary import Vocabulary
from tiny_models import save_tiny_open_clip_convnext, save_tiny_open_clip_resnet

torch.set_num_threads(1)


def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``value [D, h, w]`` at pixel coordinates (centres at integers), zero outside."""
    d, h, w = value.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(d, dtype=value.dtype)
    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            out += value[:, yy, xx] * (1 - abs(x - xx)) * (1 - abs(y - yy))
    return out


def naive_deform_attn(value, shapes, locations, weights):
    """Per (batch, query, head, level, point): one bilinear read at ``loc·size − 0.5``."""
    b, _, m, dh = value.shape
    _, q, _, _, n_points, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(b, q, m, dh, dtype=torch.float64)
    for bi in range(b):
        for level, (h, w) in enumerate(shapes):
            grid = value[bi, starts[level] : starts[level + 1]].reshape(h, w, m, dh)
            for head in range(m):
                plane = grid[:, :, head].permute(2, 0, 1).double()
                for qi in range(q):
                    for p in range(n_points):
                        lx, ly = locations[bi, qi, head, level, p].tolist()
                        sample = bilinear(plane, lx * w - 0.5, ly * h - 0.5)
                        out[bi, qi, head] += weights[bi, qi, head, level, p] * sample
    return out.reshape(b, q, m * dh).float()


def test_deformable_sampling_matches_a_per_point_loop() -> None:
    torch.manual_seed(0)
    shapes = [(3, 5), (6, 4), (7, 9)]
    b, m, dh, q, p = 2, 3, 4, 5, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), m, dh)
    locations = torch.rand(b, q, m, len(shapes), p, 2) * 1.4 - 0.2  # some outside the map
    weights = torch.rand(b, q, m, len(shapes), p)
    ours = ms_deform_attn_sample(value, shapes, locations, weights)
    expected = naive_deform_attn(value, shapes, locations, weights)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_deformable_module_offsets_are_pixels_of_each_level() -> None:
    torch.manual_seed(1)
    shapes = [(2, 3), (4, 6)]
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_()
    query = torch.randn(1, 4, 8)
    source = torch.randn(1, 6 + 24, 8)
    ref = torch.rand(1, 4, 2, 2)
    out = attn(query, ref, source, shapes)
    value = attn.value_proj(source).reshape(1, 30, 2, 4)
    offsets = attn.sampling_offsets(query).reshape(1, 4, 2, 2, 3, 2)
    weights = attn.attention_weights(query).reshape(1, 4, 2, 6).softmax(-1).reshape(1, 4, 2, 2, 3)
    locations = torch.empty_like(offsets)
    for level, (h, w) in enumerate(shapes):
        locations[:, :, :, level, :, 0] = (
            ref[:, :, None, level, None, 0] + offsets[..., level, :, 0] / w
        )
        locations[:, :, :, level, :, 1] = (
            ref[:, :, None, level, None, 1] + offsets[..., level, :, 1] / h
        )
    expected = attn.output_proj(naive_deform_attn(value, shapes, locations, weights))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sine_position_embedding_formula() -> None:
    pos = sine_position_embedding((1, 8, 3, 4), 4)
    assert pos.shape == (1, 8, 3, 4)
    y, x = 1, 2
    ey = (y + 1) / (3 + 1e-6) * 2 * math.pi
    ex = (x + 1) / (4 + 1e-6) * 2 * math.pi
    expected = []
    for e in (ey, ex):
        for i in range(4):
            angle = e / 10000 ** (2 * (i // 2) / 4)
            expected.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    torch.testing.assert_close(pos[0, :, y, x], torch.tensor(expected))


def test_masked_cross_attention_ignores_blocked_positions() -> None:
    torch.manual_seed(2)
    layer = DecoderLayer(hidden_dim=8, n_heads=2, ffn_dim=16).eval()
    query, qpos = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    memory, mpos = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    blocked = torch.tensor([[False, True, False, True, True]]).expand(3, 5)
    mask = blocked[None].repeat_interleave(2, 0)  # [heads, Q, S]
    out = layer(query, qpos, memory, mpos, mask)
    memory2 = memory.clone()
    memory2[:, blocked[0]] += 10.0
    torch.testing.assert_close(layer(query, qpos, memory2, mpos, mask), out)
    # explicit attention over the allowed positions only
    attn = layer.cross_attn
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    qh = ((query + qpos) @ wq.T + bq).reshape(3, 2, 4).transpose(0, 1)
    kh = ((memory + mpos) @ wk.T + bk).reshape(5, 2, 4).transpose(0, 1)
    vh = (memory @ wv.T + bv).reshape(5, 2, 4).transpose(0, 1)
    scores = (qh @ kh.transpose(1, 2) / 2.0).masked_fill(blocked[0], float("-inf"))
    attended = (scores.softmax(-1) @ vh).transpose(0, 1).reshape(1, 3, 8)
    x = layer.cross_norm(query + attn.out_proj(attended))
    x = layer.self_norm(x + layer.self_attn(x + qpos, x + qpos, x)[0])
    expected = layer.ffn_norm(x + layer.linear2(F.relu(layer.linear1(x))))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_attention_mask_rule_and_mask_pooling() -> None:
    torch.manual_seed(3)
    decoder = TransformerDecoder(
        hidden_dim=8, num_queries=4, n_heads=2, ffn_dim=16, num_layers=1, mask_dim=8, embed_dim=6
    )
    features = torch.randn(1, 8, 8, 8)
    logits, embeddings, mask = decoder.heads(decoder.query_feat.weight[None], features, (4, 4))
    assert logits.shape == (1, 4, 8, 8) and embeddings.shape == (1, 4, 6)
    small = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    for qi in range(4):
        blocked = small[0, qi].flatten().sigmoid() < 0.5
        expected = torch.zeros_like(blocked) if blocked.all() else blocked
        assert torch.equal(mask[0, qi], expected) and torch.equal(mask[1, qi], expected)
    pooled = mask_pool(features, logits)
    for qi in range(4):
        inside = logits[0, qi] > 0
        mean = features[0][:, inside].mean(1) if inside.any() else torch.zeros(8)
        torch.testing.assert_close(pooled[0, qi], mean, atol=1e-5, rtol=1e-5)


def test_geometric_ensemble_formula() -> None:
    torch.manual_seed(4)
    in_logits, out_logits = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    seen = torch.tensor([True, False, True, False])
    probs = geometric_ensemble(in_logits, out_logits, seen, alpha=0.4, beta=0.8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    p_in, p_out = in_logits[..., :4].softmax(-1), out_logits[..., :4].softmax(-1)
    w = torch.where(seen, 0.4, 0.8)
    mixed = p_in ** (1 - w) * p_out**w
    p_void = in_logits.softmax(-1)[..., 4:]
    expected = torch.cat([mixed / mixed.sum(-1, keepdim=True) * (1 - p_void), p_void], -1)
    torch.testing.assert_close(probs, expected)
    valid = torch.tensor([[True, False, True], [False, True, True]])
    masked = geometric_ensemble(in_logits, out_logits, seen, valid=valid)
    torch.testing.assert_close(masked[0, 1, :4], p_in[0, 1] * (1 - p_void[0, 1]))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fcclip-clip")
    return {
        "convnext": save_tiny_open_clip_convnext(root / "convnext"),
        "resnet": save_tiny_open_clip_resnet(root / "resnet"),
    }


def tiny_model(directory: Path, channels: tuple[int, int, int, int], seed: int = 0) -> FCCLIP:
    clip = open_clip.create_model(f"local-dir:{directory}").eval()
    torch.manual_seed(seed)
    model = FCCLIP(FCCLIPConfig.reduced(channels, 16), clip).eval()
    with torch.no_grad():  # non-trivial norms, biases and embeddings
        for name, param in model.named_parameters():
            if not name.startswith("clip_model."):
                param.add_(0.1 * torch.randn_like(param))
    return model


def text_embeddings(seed: int = 0) -> ClassEmbeddings:
    gen = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    return ClassEmbeddings(emb, torch.tensor([0, 0, 1, 2, 3, 3]), 4)


def test_convnext_out_of_vocabulary_path_equals_clip_on_a_full_mask(tiny_dirs) -> None:
    model = tiny_model(tiny_dirs["convnext"], (8, 16, 24, 32))
    pixels = torch.randn(1, 3, 64, 96)
    feats, dense = model.backbone_features(pixels)
    assert [f.shape[-1] for f in feats] == [24, 12, 6, 3]
    full = torch.ones(1, 1, *dense.shape[-2:])
    torch.testing.assert_close(
        model.embed_masks(dense, full)[0, 0], model.clip_model.encode_image(pixels)[0]
    )
    with torch.no_grad():
        out = model(pixels, text_embeddings())
    assert out.mask_logits.shape == (1, 10, 16, 24)
    assert out.in_vocab_logits.shape == out.out_vocab_logits.shape == (1, 10, 5)
    # class logit = scale × max over synonyms (class 0 has synonyms 0 and 1)
    assert torch.isfinite(out.in_vocab_logits).all()
    probs = model.class_probs(out, torch.tensor([True, True, False, False]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 10))


def test_resnet_variant_attends_only_inside_the_mask(tiny_dirs) -> None:
    model = tiny_model(tiny_dirs["resnet"], (32, 64, 128, 256))
    pixels = torch.randn(1, 3, 64, 64)
    pool = model.clip_model.visual.attnpool
    with torch.no_grad():
        out = model(pixels, text_embeddings())
        _, dense = model.backbone_features(pixels)
        mask = torch.full((1, 1, 2, 2), -1.0)
        mask[..., 0, 1] = 1.0
        changed = dense.clone()
        changed[..., 1, 1] += 5.0  # outside the mask
        a, b = model.embed_masks(dense, mask), model.embed_masks(changed, mask)
        # one allowed cell: attention weight 1 on it, whatever the query
        key = dense[0, :, 0, 1] + pool.positional_embedding[2]  # grid cell (0, 1) → token 2
        expected = pool.c_proj(pool.v_proj(key))
    assert out.out_vocab_logits.shape == (1, 10, 5)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0, 0], expected, atol=1e-5, rtol=1e-5)


def test_preprocess_and_mask_resizing_follow_detectron2() -> None:
    assert resize_size(480, 640) == (800, 1067)
    assert resize_size(300, 1200) == (333, 1333)
    image = np.full((50, 70, 3), 128, dtype=np.uint8)
    pixels, resized = preprocess(image, (45, 63))
    assert resized == (45, 63) and pixels.shape == (1, 3, 64, 64)
    assert pixels[0, :, 45:].abs().max() == 0 and pixels[0, :, :, 63:].abs().max() == 0
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, :, :12] = 1.0
    up = masks_to_image(logits, resized, (50, 70))
    assert up.shape == (1, 2, 50, 70) and (up[0, 0] > 0).float().mean() > 0.9


ORIGINAL_HEAD_KEYS = [  # written out by hand from the original module names (facts.md)
    "sem_seg_head.pixel_decoder.input_proj.2.1.bias",
    "sem_seg_head.pixel_decoder.transformer.level_embed",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.weight",
    "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.bias",
    "sem_seg_head.pixel_decoder.adapter_1.weight",
    "sem_seg_head.pixel_decoder.adapter_1.norm.bias",
    "sem_seg_head.pixel_decoder.layer_1.norm.weight",
    "sem_seg_head.pixel_decoder.mask_features.bias",
    "sem_seg_head.predictor.transformer_self_attention_layers.8.self_attn.in_proj_weight",
    "sem_seg_head.predictor.transformer_self_attention_layers.0.norm.weight",
    "sem_seg_head.predictor.transformer_cross_attention_layers.3.multihead_attn.out_proj.bias",
    "sem_seg_head.predictor.transformer_ffn_layers.4.linear2.weight",
    "sem_seg_head.predictor.transformer_ffn_layers.4.norm.bias",
    "sem_seg_head.predictor.decoder_norm.weight",
    "sem_seg_head.predictor.query_feat.weight",
    "sem_seg_head.predictor.level_embed.weight",
    "sem_seg_head.predictor.mask_embed.layers.2.bias",
    "sem_seg_head.predictor._mask_pooling_proj.0.weight",
    "sem_seg_head.predictor.class_embed.layers.2.weight",
    "sem_seg_head.predictor.logit_scale",
    "void_embedding.weight",
]


def to_original(key: str) -> str:
    """Our key → the original's, written independently of the loader's rules."""
    if key.startswith("clip_model."):
        return "backbone." + key
    if key == "void_embedding.weight":
        return key
    part, rest = key.split(".", 1)
    if part == "pixel_decoder":
        for ours, theirs in (("lateral_convs.0.", "adapter_1."), ("output_convs.0.", "layer_1.")):
            if rest.startswith(ours):
                rest = theirs + rest[len(ours) :].replace("0.weight", "weight").replace(
                    "1.", "norm."
                )
        if rest.startswith("layers."):
            rest = "transformer.encoder." + rest
        if rest == "level_embed":
            rest = "transformer.level_embed"
        return "sem_seg_head.pixel_decoder." + rest
    if rest.startswith("layers."):
        _, index, name = rest.split(".", 2)
        table = {
            "self_attn.": f"transformer_self_attention_layers.{index}.self_attn.",
            "self_norm.": f"transformer_self_attention_layers.{index}.norm.",
            "cross_attn.": f"transformer_cross_attention_layers.{index}.multihead_attn.",
            "cross_norm.": f"transformer_cross_attention_layers.{index}.norm.",
            "linear1.": f"transformer_ffn_layers.{index}.linear1.",
            "linear2.": f"transformer_ffn_layers.{index}.linear2.",
            "ffn_norm.": f"transformer_ffn_layers.{index}.norm.",
        }
        prefix = next(p for p in table if name.startswith(p))
        rest = table[prefix] + name[len(prefix) :]
    rest = rest.replace("mask_pooling_proj.", "_mask_pooling_proj.")
    return "sem_seg_head.predictor." + rest


def test_full_size_head_has_the_original_key_set() -> None:
    shapes = head_shapes(CONVNEXT_LARGE)
    originals = {to_original(k) for k in shapes}
    assert sum(k.startswith("sem_seg_head.pixel_decoder.") for k in originals) == 117
    assert sum(k.startswith("sem_seg_head.predictor.") for k in originals) == 184
    assert set(ORIGINAL_HEAD_KEYS) <= originals
    for key in originals:
        assert map_key(key) is not None and to_original(map_key(key)) == key
    assert shapes["predictor.class_embed.layers.2.weight"] == (768, 256)
    assert shapes["pixel_decoder.input_proj.0.0.weight"] == (256, 1536, 1, 1)
    assert shapes["pixel_decoder.layers.0.linear1.weight"] == (1024, 256)
    assert shapes["predictor.query_feat.weight"] == (250, 256)


def original_checkpoint(model: FCCLIP) -> dict[str, torch.Tensor]:
    state = {to_original(k): v.clone() for k, v in model.state_dict().items()}
    state["criterion.empty_weight"] = torch.ones(5)
    return state


def test_loading_an_original_state_dict_reproduces_the_model(tiny_dirs, tmp_path) -> None:
    source = tiny_model(tiny_dirs["convnext"], (8, 16, 24, 32), seed=5)
    target = tiny_model(tiny_dirs["convnext"], (8, 16, 24, 32), seed=6)
    state = original_checkpoint(source)
    report = load_fcclip_weights(target, state)
    assert report.ok and report.ignored == ["criterion.empty_weight"]
    assert report.backbone_max_diff == 0.0
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = source(pixels, text_embeddings()), target(pixels, text_embeddings())
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.in_vocab_logits, b.in_vocab_logits)
    # a converted file loads the same way
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "iteration": 7}, path)
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        convert_fcclip(path, tmp_path / "x.safetensors")  # tiny head vs the full-size variant
    converted, metadata = load_converted_or_none(tmp_path, state)
    assert metadata["format"] == "retclip-fcclip/1"
    third = tiny_model(tiny_dirs["convnext"], (8, 16, 24, 32), seed=7)
    assert load_fcclip_weights(third, converted).ok
    torch.testing.assert_close(
        third.state_dict()["predictor.logit_scale"], state["sem_seg_head.predictor.logit_scale"]
    )


def load_converted_or_none(tmp_path: Path, state: dict[str, torch.Tensor]):
    from retclip.fcclip.checkpoint import map_state_dict, save_converted

    mapped, _, _ = map_state_dict(state)
    head = {k: v for k, v in mapped.items() if not k.startswith("clip_model.")}
    path = save_converted(tmp_path / "head.safetensors", head, variant="tiny")
    return load_converted(path)


def test_strict_loading_reports_every_problem(tiny_dirs) -> None:
    model = tiny_model(tiny_dirs["convnext"], (8, 16, 24, 32))
    state = original_checkpoint(model)
    del state["sem_seg_head.predictor.query_embed.weight"]
    state["sem_seg_head.predictor.extra.weight"] = torch.zeros(1)
    state["sem_seg_head.pixel_decoder.mask_features.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_fcclip_weights(model, state)
    report = info.value.report
    assert report.missing == ["predictor.query_embed.weight"]
    assert report.unexpected == ["sem_seg_head.predictor.extra.weight"]  # no rule: original name
    assert [m[0] for m in report.mismatched] == ["pixel_decoder.mask_features.weight"]
    text = str(info.value)
    assert "predictor.query_embed.weight" in text and "[3, 3]" in text
    other = original_checkpoint(model)
    other["backbone.clip_model.logit_scale"] = other["backbone.clip_model.logit_scale"] + 1.0
    with pytest.raises(CheckpointError, match="differs from the OpenCLIP weights"):
        load_fcclip_weights(model, other)
    assert load_fcclip_weights(model, other, backbone="load").ok


def tiny_fcclip_proposer(tiny_dirs, tmp_path) -> tuple[OpenClipBackbone, FcclipProposer]:
    """A tiny FC-CLIP on a backbone with FC-CLIP's recipe (short side 64, long side <= 96)."""
    backbone = OpenClipBackbone(
        str(tiny_dirs["convnext"]), resolution=64, max_size=96, preprocessing="fcclip"
    )
    model = tiny_model(tiny_dirs["convnext"], (8, 16, 24, 32), seed=8)
    model.clip_model.load_state_dict(backbone.model.state_dict())
    path = tmp_path / "fcclip.pth"
    torch.save({"model": original_checkpoint(model)}, path)
    return backbone, FcclipProposer(path, backbone=backbone, config=model.config, device="cpu")


def test_proposer_feeds_every_query_into_the_segmenter(tiny_dirs, tmp_path) -> None:
    backbone, proposer = tiny_fcclip_proposer(tiny_dirs, tmp_path)
    assert "fcclip" in PROPOSERS
    image = np.random.default_rng(0).integers(0, 255, (48, 60, 3), dtype=np.uint8)
    vocab = Vocabulary.from_string("person, wall, spaceship")
    proposals = proposer.propose(SourceImage(image), vocab)
    assert len(proposals) == proposer.model.config.num_queries  # no query dropped here
    assert proposals.masks.shape[1:] == (48, 60) and proposals.s_iv is not None
    assert proposals.mask_probs is not None and proposals.p_void is not None
    np.testing.assert_array_equal(proposals.masks, proposals.mask_probs >= 0.5)
    assert proposals.s_iv.shape == (len(proposals), 3)
    np.testing.assert_allclose(proposals.s_iv.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(proposals.scores, 1 - proposals.p_void, rtol=1e-6)
    assert proposals.features is not None
    np.testing.assert_allclose(np.linalg.norm(proposals.features, axis=1), 1.0, rtol=1e-5)
    segmenter = Segmenter(backbone, proposer, train_vocab="coco-panoptic-133", device="cpu")
    assert segmenter.pooling == "binary"
    result = segmenter(image, ["person", "wall", "spaceship"])
    assert result.scores.s_iv is not None and result.scores.p_void is not None
    assert result.scores.seen is not None and result.scores.seen.tolist() == [True, True, False]
    assert result.class_probs().shape == (len(proposals), 4)  # void column last


def test_one_backbone_pass_per_image_serves_every_path(tiny_dirs, tmp_path) -> None:
    backbone, proposer = tiny_fcclip_proposer(tiny_dirs, tmp_path)
    calls = []
    hook = backbone.model.visual.trunk.stem.register_forward_hook(lambda *a: calls.append(1))
    try:
        segmenter = Segmenter(backbone, proposer, train_vocab="coco-panoptic-133", device="cpu")
        image = np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)
        segmenter(image, ["person", "wall"])
        assert len(calls) == 1
        prepared = [segmenter.prepare(image, ["person", "wall"]) for _ in range(2)]
        segmenter.finish(prepared)
        assert len(calls) == 3
    finally:
        hook.remove()


def test_proposer_needs_fcclips_recipe_on_the_shared_backbone(tiny_dirs, tmp_path) -> None:
    backbone, proposer = tiny_fcclip_proposer(tiny_dirs, tmp_path)
    grid = OpenClipBackbone(str(tiny_dirs["convnext"]), resolution=64)
    with pytest.raises(InputError, match="recipe"):
        FcclipProposer(tmp_path / "fcclip.pth", backbone=grid, config=proposer.model.config)
    with pytest.raises(InputError, match="segmenter's"):
        Segmenter(grid, proposer, device="cpu")
    with pytest.raises(InputError, match="binary"):
        Segmenter(backbone, proposer, pooling="soft", device="cpu")


def test_proposer_requires_a_checkpoint() -> None:
    with pytest.raises(InputError, match="--fcclip-checkpoint"):
        FcclipProposer(None)
