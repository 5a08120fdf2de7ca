"""``regions``: a weight-free proposer — compact watershed superpixels merged by mean colour.

Usable on any image with no download, it stands in for a learned proposer in the demo's
"predicted proposals" setting. The image is blurred (a fraction of its short side) so that fine
textures average into their mean colour; a compact watershed on the colour gradient cuts it into
superpixels whose borders follow edges; a region adjacency graph then merges neighbouring
superpixels whose mean colours differ by less than ``threshold`` (scikit-image's
``rag_mean_color`` + ``cut_threshold``). Regions smaller than ``min_area`` of the image are not
proposed (their pixels stay void unless another proposal covers them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from retclip.errors import InputError
from retclip.proposers.base import MaskProposer, Proposals, TextEmbeddings

if TYPE_CHECKING:
    from retclip.images import SourceImage
    from retclip.vocabulary import Vocabulary


class RegionsProposer(MaskProposer):
    """Colour regions of an image; one mask per region, score 1, no class hints.

    Args:
        blur: Gaussian sigma as a fraction of the image's short side (0.02 → 1.9 px at 96 px).
        superpixels: number of watershed markers (superpixels before merging).
        threshold: largest mean-colour distance (RGB in [0, 1]) of merged neighbours.
        min_area: smallest region proposed, as a fraction of the image area.
    """

    name = "regions"

    def __init__(
        self,
        blur: float = 0.02,
        superpixels: int = 300,
        threshold: float = 0.12,
        min_area: float = 0.005,
    ) -> None:
        if blur < 0 or superpixels < 1 or threshold < 0 or not 0 <= min_area < 1:
            raise InputError(
                "regions proposer needs blur >= 0, superpixels >= 1, threshold >= 0 and "
                f"0 <= min_area < 1, got blur={blur}, superpixels={superpixels}, "
                f"threshold={threshold}, min_area={min_area}"
            )
        self.blur = blur
        self.superpixels = superpixels
        self.threshold = threshold
        self.min_area = min_area

    def propose(
        self, image: SourceImage, vocabulary: Vocabulary, text_embeddings: TextEmbeddings = None
    ) -> Proposals:
        from skimage import graph
        from skimage.filters import gaussian, sobel
        from skimage.segmentation import watershed

        pixels = image.pixels
        h, w = pixels.shape[:2]
        smooth = gaussian(
            pixels.astype(np.float32) / 255.0, sigma=self.blur * min(h, w), channel_axis=-1
        )  # [H, W, 3]
        gradient = np.sqrt(sum(sobel(smooth[..., c]) ** 2 for c in range(3)))  # [H, W]
        superpixels = watershed(gradient, markers=self.superpixels)  # [H, W] labels from 1
        adjacency = graph.rag_mean_color(smooth, superpixels)
        labels = graph.cut_threshold(superpixels, adjacency, self.threshold)  # [H, W]
        masks = labels[None] == np.unique(labels)[:, None, None]  # [N, H, W]
        masks = masks[masks.sum(axis=(1, 2)) >= max(1, self.min_area * h * w)]
        return Proposals(masks=masks, scores=np.ones(len(masks), np.float32))
