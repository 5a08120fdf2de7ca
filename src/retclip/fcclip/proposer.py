"""``--proposer fcclip``: FC-CLIP as RetCLIP's cross-dataset path (paper §2.2, Fig. 2, Table 1).

One frozen OpenCLIP ConvNeXt-L (or RN50x64) is shared: the proposer's single backbone pass feeds
FC-CLIP's pixel decoder and mask decoder, the in-vocabulary classifier, and the out-of-vocabulary
mask pooling whose embeddings are RetCLIP's ``s_clip`` *and* retrieval query. The backbone is the
:class:`~retclip.segmenter.Segmenter`'s own (with FC-CLIP's input recipe,
``preprocessing="fcclip"``), and the segmenter runs no second pass. For every one of the ``Q``
queries the proposer gives:

- ``mask_probs``: the sigmoid of the mask logits at image size (upsampled to the padded input,
  cropped, resized: FC-CLIP's ``sem_seg_postprocess``), and ``masks = mask_probs >= 0.5``;
- ``features``: FC-CLIP's out-of-vocabulary embeddings (mask logits bilinearly resized to the
  stride-32 map, ``> 0``, mean-pooled, trunk-head norm + ``visual.head``), unit-norm;
- ``s_iv``: the in-vocabulary softmax over the ``C`` classes (void dropped), and ``p_void``: the
  void probability of the in-vocabulary softmax over ``C + 1``; ``scores = 1 − p_void``;
- ``oov_valid`` for the ResNet model (FC-CLIP's ``ENSEMBLE_ON_VALID_MASK``).

No query is dropped here: the void decision, the object-mask threshold and the merge belong to
the segmenter's post-processing, which with ``combine="fcclip"`` and no database reproduces
FC-CLIP's outputs (``docs/fcclip.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from retclip.backbones.open_clip_convnext import OpenClipBackbone
from retclip.backbones.registry import load_backbone, resolve_device
from retclip.errors import InputError
from retclip.fcclip.checkpoint import load_fcclip_weights, load_weights
from retclip.fcclip.model import CONVNEXT_LARGE, FCCLIP, RN50X64, FCCLIPConfig, masks_to_image
from retclip.images import SourceImage, image_to_tensor
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings
from retclip.text_embeddings import embed_vocabulary
from retclip.vocabulary import Vocabulary


class FcclipProposer(MaskProposer):
    """FC-CLIP's queries with their masks, in-vocabulary and void probabilities, and embeddings.

    Args:
        checkpoint: ``fcclip_cocopan.pth`` (original key names) or the ``.safetensors`` written
            by ``retclip convert-fcclip``.
        backbone: retclip backbone name (``convnext-l``, ``rn50x64``, an OpenCLIP directory),
            built with FC-CLIP's input recipe, or an :class:`OpenClipBackbone` built with
            ``preprocessing="fcclip"`` (the segmenter's); the checkpoint's CLIP must equal it.
        config: head architecture, or a JSON file of its fields; default by backbone kind
            (:data:`CONVNEXT_LARGE` / :data:`RN50X64`, the released models).
        backbone_check: ``"verify"`` (default) the checkpoint's CLIP weights against the
            backbone's, ``"load"`` them into it, or ``"skip"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: the backbone's weights' dtype when built here by name (the head runs float32).
        resolution, max_size: test resize when the backbone is built here by name (FC-CLIP's
            800 / 1333); a given backbone brings its own.
    """

    name = "fcclip"
    #: FC-CLIP binarises its mask logits on the stride-32 grid before mean pooling.
    feature_pooling = "binary"
    backbone: OpenClipBackbone

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        backbone: str | OpenClipBackbone = "convnext-l",
        config: FCCLIPConfig | str | Path | None = None,
        backbone_check: Literal["load", "verify", "skip"] = "verify",
        device: str = "auto",
        dtype: str | None = None,
        resolution: int | None = None,
        max_size: int | None = None,
    ) -> None:
        if checkpoint is None:
            raise InputError(
                "proposer 'fcclip' needs FC-CLIP's weights: pass --fcclip-checkpoint "
                "fcclip_cocopan.pth (or its converted .safetensors)"
            )
        self.device = resolve_device(device)
        if isinstance(backbone, str):
            options: dict[str, object] = {"preprocessing": "fcclip"}
            for key, value in (("dtype", dtype), ("resolution", resolution)):
                if value:
                    options[key] = value
            if max_size:
                options["max_size"] = max_size
            loaded = load_backbone(backbone, self.device, **options)
            if not isinstance(loaded, OpenClipBackbone):
                raise InputError(
                    f"proposer 'fcclip' needs an OpenCLIP ConvNeXt or ResNet backbone, "
                    f"got {backbone!r}"
                )
            backbone = loaded
        if not isinstance(backbone, OpenClipBackbone) or backbone.preprocessing != "fcclip":
            raise InputError(
                "proposer 'fcclip' shares its backbone with the segmenter and needs FC-CLIP's "
                "input recipe: build the backbone with preprocessing='fcclip' (--recipe fcclip)"
            )
        self.backbone = backbone
        if config is None:
            config = RN50X64 if backbone.kind == "resnet" else CONVNEXT_LARGE
        elif not isinstance(config, FCCLIPConfig):
            config = FCCLIPConfig.from_json(config)
        self.model = FCCLIP(config, backbone.model).to(backbone.device).eval()
        self.report = load_fcclip_weights(
            self.model, load_weights(checkpoint), backbone=backbone_check
        )

    @torch.inference_mode()
    def propose(
        self, image: SourceImage, vocabulary: Vocabulary, text_embeddings: TextEmbeddings = None
    ) -> Proposals:
        """All ``Q`` queries of ``image`` for ``vocabulary`` (all synonyms of each class),
        classified with ``text_embeddings`` when given (the segmenter's; else embedded here)."""
        text = text_embeddings
        if text is None:
            text = embed_vocabulary(self.backbone, vocabulary)
        text = text.to(self.backbone.device)
        h, w = image.size
        frame = self.backbone.frame(h, w)
        if frame is None:  # guarded in __init__; kept for the type checker
            raise InputError("proposer 'fcclip' needs a backbone with preprocessing='fcclip'")
        pixels = self.backbone.preprocess(image_to_tensor(image.pixels)[None])  # one backbone pass
        output = self.model(pixels, text)
        logits = masks_to_image(output.mask_logits, (frame[0], frame[1]), (h, w))[0]  # [Q, H, W]
        mask_probs = logits.sigmoid()
        in_vocab = output.in_vocab_logits[0]  # [Q, C + 1]
        p_void = in_vocab.softmax(-1)[:, -1]
        s_iv = in_vocab[:, :-1].softmax(-1)
        features = F.normalize(output.clip_embeddings[0].float(), dim=-1)
        valid = output.valid[0] if self.model.config.ensemble_on_valid_mask else None
        return Proposals(
            masks=(mask_probs >= 0.5).cpu().numpy(),
            mask_probs=mask_probs.float().cpu().numpy(),
            scores=(1.0 - p_void).float().cpu().numpy(),
            s_iv=s_iv.float().cpu().numpy(),
            p_void=p_void.float().cpu().numpy(),
            features=features.cpu().numpy(),
            oov_valid=None if valid is None else valid.cpu().numpy(),
        )
