"""``retclip segment``: images and a vocabulary in, the five output files per image out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from retclip.cli.options import (
    CleanErrorsCommand,
    ensemble_options,
    model_options,
    output_dir,
    pipeline_spec,
    retrieval_options,
    train_vocab_option,
    with_options,
)
from retclip.errors import InputError
from retclip.pipeline import ModelSpec


@click.command(cls=CleanErrorsCommand)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--classes", help='Class names, comma-separated; synonyms with "|": "sofa|couch, wall".'
)
@click.option("--vocab", help="A built-in vocabulary (ade20k-150, coco-panoptic-133) or a file.")
@click.option("--proposer", required=True, help=ModelSpec.model_fields["proposer"].description)
@with_options(model_options())
@with_options(retrieval_options)
@with_options(train_vocab_option)
@with_options(ensemble_options)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
def segment(
    images: tuple[Path, ...],
    classes: str | None,
    vocab: str | None,
    proposer: str,
    out: Path,
    **options: Any,
) -> None:
    """Segment IMAGES with the given classes; writes five files per image into --out.

    For each image <stem>: <stem>_panoptic.png/.json (COCO panoptic), <stem>_semantic.png,
    <stem>_instances.json (COCO results, RLE), <stem>_overlay.png, and <stem>_scores.npz (the
    per-mask s_clip / s_ret / s_iv, for re-scoring without a model pass).
    """
    from retclip.images import load_image
    from retclip.pipeline import build_segmenter
    from retclip.vocabulary import Vocabulary

    vocabulary = Vocabulary.from_choice(classes, vocab)
    stems = [image.stem for image in images]
    if len(set(stems)) != len(stems):
        raise InputError("two images share a file name stem; their outputs would collide")
    for image in images:  # every image is readable before anything is written for any
        load_image(image)
    with output_dir(out):
        segmenter = build_segmenter(pipeline_spec(options, proposer))
        for image in tqdm(images, unit="img", desc="segment", disable=len(images) < 2):
            result = segmenter(load_image(image), vocabulary, source=image)
            result.save(out, image.stem)
            found = sorted({result.label_of(s) for s in result.segments})
            click.echo(f"{image}: {len(result.segments)} segments ({', '.join(found) or 'none'})")
