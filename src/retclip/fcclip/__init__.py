"""FC-CLIP in plain PyTorch (no detectron2, no compiled ops) and its RetCLIP proposer.

:mod:`.model` holds the network, :mod:`.checkpoint` loads the released ``fcclip_cocopan.pth``,
:mod:`.proposer` plugs it into RetCLIP as ``--proposer fcclip``. See ``docs/fcclip.md``.
"""

from retclip.fcclip.model import (
    CONVNEXT_LARGE,
    FCCLIP,
    RN50X64,
    FCCLIPConfig,
    FCCLIPOutput,
    geometric_ensemble,
)

__all__ = [
    "CONVNEXT_LARGE",
    "FCCLIP",
    "RN50X64",
    "FCCLIPConfig",
    "FCCLIPOutput",
    "geometric_ensemble",
]
