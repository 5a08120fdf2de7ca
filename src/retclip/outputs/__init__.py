"""Outputs of a segmentation: COCO records, the overlay, and the ``<stem>_*`` result files.

- :mod:`~retclip.outputs.records` — the COCO-compatible records of a result (one place);
- :mod:`~retclip.outputs.drawing` — the overlay and each segment's colour;
- :mod:`~retclip.outputs.files` — the one writer and the one reader of the ``<stem>_*`` files.
"""

from __future__ import annotations

from retclip.outputs.drawing import label_points, palette, render_overlay, segment_colours
from retclip.outputs.files import (
    OUTPUT_SUFFIXES,
    ResultFiles,
    output_paths,
    read_outputs,
    write_outputs,
)
from retclip.outputs.records import (
    categories,
    category_flags,
    encode_rle,
    instance_records,
    segment_record,
)

__all__ = [
    "OUTPUT_SUFFIXES",
    "ResultFiles",
    "categories",
    "category_flags",
    "encode_rle",
    "instance_records",
    "label_points",
    "output_paths",
    "palette",
    "read_outputs",
    "render_overlay",
    "segment_colours",
    "segment_record",
    "write_outputs",
]
