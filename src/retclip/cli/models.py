"""``retclip models``, ``retclip vocab`` and ``retclip convert-fcclip``: what models and
vocabularies there are, and FC-CLIP's checkpoint in retclip's names."""

from __future__ import annotations

import json
from pathlib import Path

import click

from retclip.cli.options import CleanErrorsCommand


@click.command("models", cls=CleanErrorsCommand)
@click.option(
    "--kind", type=click.Choice(["backbone", "detector", "segmenter"]), help="Only this kind."
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def models_command(kind: str | None, as_json: bool) -> None:
    """List the registered models: short name, hub id, kind, size and licence.

    Weights are never downloaded by the tests; to use a model offline, fetch it once with
    `hf download <hub id>` (or pass a local directory as the model name). See docs/models.md.
    """
    from retclip.models import list_models

    entries = list_models(kind)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in entries], indent=2))
        return
    click.echo(f"{'name':<22}{'kind':<11}{'params':>8}  {'licence':<12}hub id")
    for m in entries:
        click.echo(f"{m.name:<22}{m.kind:<11}{m.params_m:>7.0f}M  {m.licence:<12}{m.hub_id}")


@click.command("vocab", cls=CleanErrorsCommand)
@click.argument("spec")
@click.option("--train-vocab", help="Mark the classes seen in this training vocabulary.")
def vocab_command(spec: str, train_vocab: str | None) -> None:
    """Show a vocabulary (built-in name or file): classes, thing/stuff, synonyms, seen flags."""
    from retclip.vocabulary import Vocabulary

    vocabulary = Vocabulary.load(spec)
    seen = vocabulary.seen_mask(Vocabulary.load(train_vocab)) if train_vocab else None
    for i, entry in enumerate(vocabulary.classes):
        kind = "thing" if entry.isthing else "stuff"
        flag = "" if seen is None else (" seen  " if seen[i] else " unseen")
        click.echo(f"{entry.id:>4} {kind}{flag}  {', '.join(entry.synonyms)}")
    if seen is not None:
        click.echo(f"{int(seen.sum())} of {len(vocabulary)} classes seen in {train_vocab}")


@click.command("convert-fcclip", cls=CleanErrorsCommand)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--variant",
    type=click.Choice(["convnext-l", "rn50x64"]),
    default="convnext-l",
    show_default=True,
    help="Architecture of the checkpoint (fcclip_cocopan.pth is convnext-l).",
)
@click.option("--include-backbone", is_flag=True, help="Also write the CLIP backbone's weights.")
def convert_fcclip_command(
    checkpoint: Path, output: Path, variant: str, include_backbone: bool
) -> None:
    """Convert FC-CLIP's released CHECKPOINT (.pth) to retclip's names in OUTPUT (.safetensors).

    Every key is checked against the architecture; missing, unexpected or mis-shaped keys are
    listed and nothing is written. Use the output with --proposer fcclip --fcclip-checkpoint.
    """
    from retclip.fcclip.checkpoint import convert_fcclip

    report = convert_fcclip(checkpoint, output, variant=variant, include_backbone=include_backbone)
    click.echo(report.format())
    click.echo(f"wrote {output}")


@click.command("configs", cls=CleanErrorsCommand)
@click.argument("name", required=False)
def configs_command(name: str | None) -> None:
    """The shipped run configs, one per row of the paper's tables, with the paper's numbers.

    With NAME, print that config (its options, and what it still needs). Use one with
    ``retclip eval --config NAME`` (or ``retclip sweep --config table4-sweep``); docs/reproduce.md
    says how to get what each needs.
    """
    from retclip.configs import load_run_config, shipped_configs

    if name is not None:
        config = load_run_config(name)
        click.echo(json.dumps({"about": config.about, **config.options}, indent=2))
        return
    click.echo(f"{'name':<28}  {'PQ':>5}  {'mAP':>5}  {'mIoU':>5}  row")
    for shipped in shipped_configs():
        config = load_run_config(shipped)
        paper = config.about.get("paper", {})
        numbers = [paper.get(k) for k in ("PQ", "mAP", "mIoU")]
        cells = [f"{v:>5.1f}" if isinstance(v, int | float) else f"{'–':>5}" for v in numbers]
        click.echo(f"{shipped:<28}  {'  '.join(cells)}  {config.about.get('row', '')}")
