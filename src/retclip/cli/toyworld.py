"""``retclip toyworld generate`` and ``retclip demo``: the offline toy world."""

from __future__ import annotations

from pathlib import Path

import click

from retclip.cli.options import CleanErrorsCommand, CleanErrorsGroup, check_output_dir
from retclip.errors import require_extra


@click.group(cls=CleanErrorsGroup)
def toyworld() -> None:
    """The offline toy world: procedural scenes with panoptic labels and captions."""


@toyworld.command("generate")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--split", type=click.Choice(["train", "db", "val"]), required=True)
@click.option("--n", "count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Splits never share a scene.")
def toyworld_generate(out: Path, split: str, count: int, seed: int) -> None:
    """Write N scenes of a split as a COCO-panoptic dataset plus a captions file.

    Files: OUT/images/*.png, OUT/panoptic_SPLIT/*.png, OUT/panoptic_SPLIT.json and
    OUT/captions_SPLIT.jsonl; the same seed always gives the same scenes.
    """
    from retclip.toyworld.dataset import write_split

    check_output_dir(out)
    json_path, _ = write_split(out, split, count, seed, progress=True)
    click.echo(f"{out}: {count} {split} scenes; annotations in {json_path}")


@click.command("demo", cls=CleanErrorsCommand)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("retclip-demo"),
    show_default=True,
    help="Output folder.",
)
@click.option("--n-db", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--n-val", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo_command(out: Path, n_db: int, n_val: int, seed: int) -> None:
    """Offline demo on the toy world: CLIP only vs retrieval only vs RetCLIP.

    Generates the world, builds a database from its db split with the shipped toy model, segments
    the val split with ground-truth and weight-free (regions) proposals, and writes metrics.json,
    figure.png, gamma_curve.png and overlays into --out. No download; about a minute on a CPU.
    """
    require_extra("demo", "retclip demo (its figures)", ("matplotlib",))
    from retclip.backbones import load_backbone
    from retclip.toyworld.demo import run_demo

    check_output_dir(out)
    summary = run_demo(
        out, backbone=load_backbone("toy"), n_db=n_db, n_val=n_val, seed=seed, log=click.echo
    )
    click.echo(
        f"\n{'proposer':<10}{'setting':<16}"
        + "".join(f"{k:>7}" for k in ("PQ", "SQ", "RQ", "mIoU", "mAP"))
    )
    for proposer in ("gt", "regions"):
        for setting, values in summary[proposer].items():
            cells = "".join(f"{v:>7.1f}" if v is not None else f"{'-':>7}" for v in values.values())
            click.echo(f"{proposer:<10}{setting:<16}{cells}")
    click.echo(f"\nwrote {out / 'metrics.json'}, {out / 'figure.png'}, {out / 'gamma_curve.png'}")
