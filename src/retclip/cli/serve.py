"""``retclip serve``: run the HTTP API and web page with uvicorn (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from retclip.cli.options import spec_options, with_options
from retclip.errors import InputError, require_extra
from retclip.pipeline import ModelSpec

#: Model options of ``serve`` (``--backbone``, ``--proposer`` and ``--device`` are its own;
#: its micro-batches are ``--batch``).
SERVED_MODEL_FIELDS = tuple(
    name
    for name in ModelSpec.model_fields
    if name not in ("backbone", "proposer", "device", "gt_json", "gt_masks", "batch_size")
)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("retclip-data"),
    show_default=True,
    help="Folder of the databases (<data-dir>/databases/<name>).",
)
@click.option(
    "--backbone",
    "backbones",
    multiple=True,
    default=("toy",),
    show_default=True,
    help="Backbone requests may use (repeat for several; the first is the default).",
)
@click.option(
    "--proposer",
    "proposers",
    multiple=True,
    default=("regions",),
    show_default=True,
    help="Proposer requests may use (repeat for several; the first is the default).",
)
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--token",
    envvar="RETCLIP_SERVE_TOKEN",
    help="Bearer token required by requests that write [env RETCLIP_SERVE_TOKEN].",
)
@click.option("--max-upload-mb", default=20.0, show_default=True, help="Largest request body.")
@click.option(
    "--max-image-pixels", default=4096 * 4096, show_default=True, help="Largest image (W×H)."
)
@click.option("--max-classes", default=1000, show_default=True, help="Most classes per request.")
@click.option(
    "--max-mask-class-pairs",
    default=250_000,
    show_default=True,
    help="Most masks x classes scored for one image (bounds a request's work).",
)
@click.option("--concurrency", default=1, show_default=True, help="Model batches run at once.")
@click.option("--queue", "max_queue", default=32, show_default=True, help="Most queued jobs.")
@click.option("--batch", "max_batch", default=4, show_default=True, help="Jobs per micro-batch.")
@click.option("--batch-wait-ms", default=0.0, show_default=True, help="Wait to fill a batch.")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, help="Seconds per job.")
@click.option("--cache-mb", default=512, show_default=True, help="Memory for /rescore results.")
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    help="Also answer requests addressed to this host name (repeat; '*' for any). Local names "
    "and --host are always allowed.",
)
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    help="Web origin (scheme://host:port) whose pages may write (repeat); the server's own is "
    "always allowed.",
)
@click.option(
    "--demo-db/--no-demo-db",
    default=True,
    show_default=True,
    help="With the toy backbone, offer the toy-world database 'toyworld' (built on first start "
    "in --data-dir) and select it on the page.",
)
@with_options(spec_options(ModelSpec, SERVED_MODEL_FIELDS))
def serve(
    host: str,
    port: int,
    data_dir: Path,
    backbones: tuple[str, ...],
    proposers: tuple[str, ...],
    device: str,
    token: str | None,
    max_upload_mb: float,
    max_image_pixels: int,
    max_classes: int,
    max_mask_class_pairs: int,
    concurrency: int,
    max_queue: int,
    max_batch: int,
    batch_wait_ms: float,
    timeout_s: float,
    cache_mb: int,
    allow_hosts: tuple[str, ...],
    allow_origins: tuple[str, ...],
    demo_db: bool,
    **model_options: Any,
) -> None:
    """Serve the segmentation API and web page (http://HOST:PORT/, API docs at /docs).

    Listens on 127.0.0.1 unless --host says otherwise; set --token before listening on another
    address, since anyone who can reach the port can otherwise add to and delete databases.
    The model options (--fcclip-checkpoint, --detector, ...) apply to every backbone and
    proposer served; --proposer fcclip runs on the first --backbone, with FC-CLIP's recipe.
    """
    require_extra("serve", "retclip serve", ("fastapi", "uvicorn", "python_multipart"))
    import uvicorn

    from retclip.server.app import ServerConfig, create_app
    from retclip.server.guards import LOCAL_HOSTS

    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        click.echo(
            f"warning: listening on {host} without --token: anyone who reaches this port can "
            "change the databases",
            err=True,
        )
    if max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    config = ServerConfig(
        data_dir=data_dir,
        backbones=backbones,
        proposers=proposers,
        device=device,
        token=token,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_image_pixels=max_image_pixels,
        max_classes=max_classes,
        max_mask_class_pairs=max_mask_class_pairs,
        max_concurrency=concurrency,
        max_queue=max_queue,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        timeout_s=timeout_s,
        result_cache_mb=cache_mb,
        model_options={k: v for k, v in model_options.items() if v is not None},
        allowed_hosts=(
            *LOCAL_HOSTS,
            *([host] if host not in ("0.0.0.0", "::") else []),
            *allow_hosts,
        ),
        allowed_origins=allow_origins,
    )
    from retclip.server.engine import Engine

    engine = Engine(config)  # models load before listening: a bad name is one Error: line
    if demo_db and "toy" in engine.backbones:
        from retclip.toyworld.demo import SERVE_DATABASE, ensure_serve_database

        click.echo(f"toy-world database '{SERVE_DATABASE}' in {data_dir} (built once, then reused)")
        ensure_serve_database(data_dir, engine.backbones["toy"])
        config = config.model_copy(update={"default_database": SERVE_DATABASE})
    uvicorn.run(create_app(config, preloaded=engine), host=host, port=port, log_level="info")
