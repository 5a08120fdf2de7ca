"""Tiny randomly initialised Grounding DINO, SAM, SAM 2.1, EdgeTAM and OWLv2 models, saved like
hub checkpoints.

Each builder makes a model of the real architecture with a few small layers (fixed seed), its
processor with an offline tokenizer (BertTokenizer from a small vocabulary whose special ids match
Grounding DINO's hard-coded ``[CLS]``/``[SEP]``/``.``/``?`` ids; CLIPTokenizer from a byte-level
vocabulary and merges), and saves both to a directory loaded through ``from_pretrained``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    CLIPTokenizer,
    EdgeTamConfig,
    EdgeTamModel,
    EdgeTamVisionConfig,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2Processor,
    Sam2Config,
    Sam2HieraDetConfig,
    Sam2ImageProcessor,
    Sam2Model,
    Sam2Processor,
    Sam2VisionConfig,
    SamConfig,
    SamImageProcessor,
    SamMaskDecoderConfig,
    SamModel,
    SamProcessor,
    SamPromptEncoderConfig,
    SamVisionConfig,
    SwinConfig,
    TimmWrapperConfig,
)

#: Whole words in the tiny BERT vocabulary; any other word is split into letters.
BERT_WORDS = ("cat", "dog", "car", "tree", "sky", "person", "wall", "road", "apple", "banana")
SAM_SIZE = 64


def bert_vocab() -> list[str]:
    """A vocabulary of 1100 tokens with the ids Grounding DINO expects for special tokens."""
    vocab = [f"[unused{i}]" for i in range(1100)]
    for index, token in {
        0: "[PAD]",
        100: "[UNK]",
        101: "[CLS]",
        102: "[SEP]",
        103: "[MASK]",
    }.items():
        vocab[index] = token
    vocab[1012], vocab[1029] = ".", "?"
    pieces = [*string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase)]
    pieces += [*string.digits, ",", "-", "'", "(", ")", "/", *BERT_WORDS]
    for index, token in enumerate(pieces, start=200):
        vocab[index] = token
    return vocab


def save_grounding_dino(directory: Path, *, seed: int = 0) -> Path:
    """A tiny Grounding DINO (Swin backbone, 2-layer BERT, 2 decoder layers) + processor."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            image_size=64,
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=1100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=256,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=12,
        num_feature_levels=4,
        max_text_len=256,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
        directory
    )
    model.save_pretrained(directory)
    return directory


def save_sam(directory: Path, *, seed: int = 0) -> Path:
    """A tiny SAM (ViT 64 px, patch 8 → 8×8 embedding) + a processor sized to match."""
    torch.manual_seed(seed)
    vision = SamVisionConfig(
        hidden_size=32,
        output_channels=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=SAM_SIZE,
        patch_size=8,
        window_size=4,
        global_attn_indexes=[1],
        num_pos_feats=8,
    )
    config = SamConfig(
        vision_config=vision,
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=SAM_SIZE, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=32,
            iou_head_hidden_dim=16,
        ),
    )
    model = SamModel(config).eval()
    image_processor = SamImageProcessor(
        size={"longest_edge": SAM_SIZE},
        pad_size={"height": SAM_SIZE, "width": SAM_SIZE},
        mask_size={"longest_edge": SAM_SIZE // 4},
        mask_pad_size={"height": SAM_SIZE // 4, "width": SAM_SIZE // 4},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


#: SAM 2 / EdgeTAM feature maps of a ``SAM_SIZE`` input: strides 4, 8, 16 (the last one is the
#: image embedding the prompt encoder's ``patch_size`` 16 matches).
_SAM2_FEATURE_SIZES = [[SAM_SIZE // 4] * 2, [SAM_SIZE // 8] * 2, [SAM_SIZE // 16] * 2]


def _sam2_heads() -> dict[str, dict[str, int]]:
    """Tiny SAM 2 prompt encoder and mask decoder settings, shared by SAM 2.1 and EdgeTAM."""
    return {
        "prompt_encoder_config": dict(
            hidden_size=32, image_size=SAM_SIZE, patch_size=16, mask_input_channels=4
        ),
        "mask_decoder_config": dict(
            hidden_size=32, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
            iou_head_hidden_dim=16,
        ),
    }  # fmt: skip


def _save_sam2_processor(directory: Path) -> None:
    image_processor = Sam2ImageProcessor(
        size={"height": SAM_SIZE, "width": SAM_SIZE},
        mask_size={"height": SAM_SIZE // 4, "width": SAM_SIZE // 4},
    )
    Sam2Processor(image_processor=image_processor).save_pretrained(directory)


def save_sam2(directory: Path, *, seed: int = 0) -> Path:
    """A tiny SAM 2.1 (Hiera with 5 blocks over 4 stages, 64 px → 4×4 embedding) + processor."""
    torch.manual_seed(seed)
    hiera = Sam2HieraDetConfig(
        hidden_size=8,
        image_size=[SAM_SIZE, SAM_SIZE],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        window_size_per_stage=[2, 2, 2, 2],
        global_attention_blocks=[3],  # not a stage's first (query-pooling) block
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=hiera,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=_SAM2_FEATURE_SIZES,
        fpn_hidden_size=32,
    )
    Sam2Model(Sam2Config(vision_config=vision, **_sam2_heads())).eval().save_pretrained(directory)
    _save_sam2_processor(directory)
    return directory


def save_edgetam(directory: Path, *, seed: int = 0) -> Path:
    """A tiny EdgeTAM (timm RepViT with one block per stage, 8-32 channels) + processor."""
    torch.manual_seed(seed)
    repvit = TimmWrapperConfig(
        architecture="repvit_m1",
        do_pooling=False,
        model_args={
            "in_chans": 3,
            "features_only": True,
            "out_indices": [0, 1, 2, 3],
            "embed_dim": [8, 16, 24, 32],
            "depth": [1, 1, 1, 1],
        },
    )
    vision = EdgeTamVisionConfig(
        backbone_config=repvit,
        backbone_channel_list=[32, 24, 16, 8],
        backbone_feature_sizes=_SAM2_FEATURE_SIZES,
        fpn_hidden_size=32,
    )
    config = EdgeTamConfig(vision_config=vision, **_sam2_heads())
    EdgeTamModel(config).eval().save_pretrained(directory)
    _save_sam2_processor(directory)
    return directory


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (CLIP's BPE alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    return dict(zip(printable + extra, chars, strict=True))


def clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a few merged words (others split into letters)."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in ("cat", "dog", "car"):
        merges += [f"{word[0]} {word[1]}", f"{word[:2]} {word[2]}</w>"]
        vocab += [word[:2], word + "</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(dict.fromkeys(vocab))}
    (directory / "vocab.json").write_text(json.dumps(ids))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))


def save_owlv2(directory: Path, *, seed: int = 0) -> Path:
    """A tiny OWLv2 (ViT 64 px, patch 16 → 16 boxes) + processor with an offline tokenizer."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(directory)
    config = Owlv2Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    model = Owlv2ForObjectDetection(config).eval()
    image_processor = Owlv2ImageProcessor(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
