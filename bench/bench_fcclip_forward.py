"""``retclip segment --proposer fcclip`` per image vs the original FC-CLIP's forward, same weights.

The original (``--fcclip-root``, run by ``--fcclip-python``, the FC-CLIP venv's python with
detectron2; never imported here) is driven in a subprocess by ``bench/fcclip_original.py``: it
builds FC-CLIP from its ADE20k evaluation config (ConvNeXt-L CLIP ``convnext_large_d_320``, 250
queries, 150 classes) with random weights and saves its state dict under the original key names.
retclip converts it with ``retclip convert-fcclip``'s function, loads the CLIP part as an OpenCLIP
folder and builds its segmenter through :func:`retclip.pipeline.build_segmenter` as ``retclip
segment --proposer fcclip --vocab ade20k-150 --db DB`` does: so both run the same weights.

Timed, one thread each, alternating image by image (retclip, original, retclip, ...): retclip's
``Segmenter.__call__`` on the 480×640 image (resize to 800 short side, its one backbone pass,
FC-CLIP's head, mask pooling, ``s_clip`` + ``s_ret`` against a database of random rows, the
panoptic merge) vs the original's ``model([{"image", "height", "width"}])`` on the image the test
``DatasetMapper`` resized (its resize is not timed), semantic + panoptic + instance inference.
Text classifiers are set before timing on both sides (FC-CLIP keeps its own; retclip caches per
vocabulary): by default random unit rows of their shapes (``--text computed``: each side's text
tower, tens of minutes for 150 classes on one thread). Target: retclip ≤ 1.05× the original.

``--quick``: the fixtures' reduced architecture (tests/fixtures/fcclip) on a 48×64 image; without
the original, retclip's side alone on the fixture's weights.

    OMP_NUM_THREADS=1 python -m bench.bench_fcclip_forward --repeats 3 \\
        --fcclip-python /work/fcclip-ref/venv/bin/python --fcclip-root /work/fcclip-ref/fc-clip
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

import retclip.segmenter as segmenter_module
from bench.common import (
    StageTimer,
    base_parser,
    markdown_table,
    median,
    report,
    results_path,
    set_threads,
)
from bench.models import TESTS, test_image
from retclip.backbones.base import Backbone
from retclip.database import FeatureDatabase
from retclip.fcclip.checkpoint import convert_fcclip, read_checkpoint
from retclip.pipeline import ModelSpec, PipelineSpec, build_segmenter
from retclip.vocabulary import Vocabulary

DRIVER = Path(__file__).resolve().parent / "fcclip_original.py"
FIXTURE_STATE = TESTS / "fixtures" / "fcclip" / "fcclip_reduced_state.safetensors"
#: The fixtures' head (tests/test_fcclip_equivalence.py's HEAD).
REDUCED_HEAD = {"in_channels": [8, 16, 24, 32], "embed_dim": 16, "num_queries": 10,
                "hidden_dim": 64, "n_heads": 4, "ffn_dim": 128, "dec_layers": 3,
                "enc_layers": 2, "mask_dim": 64}  # fmt: skip
CLIP_PREFIX = "backbone.clip_model."
STAGES = ("FC-CLIP proposer", "model forward", "scores", "retrieval", "merge")


class Original:
    """The original FC-CLIP in its own python, spoken to in JSON lines (fcclip_original.py)."""

    def __init__(
        self, python: Path, root: Path, state: Path, threads: int, reduced: bool, text: str
    ) -> None:
        command = [str(python), str(DRIVER), "--fcclip-root", str(root), "--state", str(state),
                   "--threads", str(threads), "--text", text]  # fmt: skip
        if reduced:
            command += ["--reduced", "--tests", str(TESTS)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env.pop("PYTHONPATH", None)  # the venv's own packages, never this checkout's
        self.log = state.with_suffix(".log")
        self._log: IO[str] = open(self.log, "w", encoding="utf-8")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=env,
        )  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                return dict(json.loads(line))
        self.process.wait()
        tail = self.log.read_text(encoding="utf-8").strip().splitlines()[-5:]
        raise RuntimeError(f"the original FC-CLIP stopped: {' / '.join(tail)}")

    def ask(self, **command: object) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self._log.close()


def missing(python: Path | None, root: Path | None) -> str | None:
    """What of the original is absent (one line), or ``None``."""
    if python is None or root is None:
        return "pass --fcclip-python (the FC-CLIP venv's python) and --fcclip-root (fc-clip)"
    if not python.is_file():
        return f"no python at --fcclip-python {python}"
    if not (root / "fcclip" / "fcclip.py").is_file():
        return f"no FC-CLIP checkout at --fcclip-root {root} (fcclip/fcclip.py)"
    return None


def openclip_folder(state: dict[str, torch.Tensor], directory: Path, reduced: bool) -> Path:
    """The checkpoint's CLIP as an OpenCLIP folder (``open_clip_config.json`` + safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    clip = {k[len(CLIP_PREFIX) :]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    clip.pop("attn_mask", None)
    save_file(
        {k: v.contiguous() for k, v in clip.items()}, str(directory / "open_clip_model.safetensors")
    )
    if reduced:
        from tiny_models import tiny_convnext_cfg

        config = tiny_convnext_cfg()
    else:
        config = open_clip.get_model_config("convnext_large_d_320")
        config = {**config, "vision_cfg": {**config["vision_cfg"], "timm_model_pretrained": False}}
    with open(directory / "open_clip_config.json", "w", encoding="utf-8") as handle:
        json.dump({"model_cfg": config, "preprocess_cfg": {}}, handle)
    return directory


def random_database(path: Path, backbone: Backbone, rows: int, names: Sequence[str]) -> Path:
    """``rows`` random unit features labelled with ``names`` in turn, pooled as FC-CLIP's."""
    db = FeatureDatabase.create(
        path, fingerprint=backbone.fingerprint, dim=backbone.dim, pooling="binary"
    )
    features = np.random.default_rng(0).standard_normal((rows, backbone.dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labels = [names[i % len(names)] for i in range(rows)]
    db.add(features, labels, sources=[f"random_{i}" for i in range(rows)])
    return path


def random_text_tower(dim: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """A stand-in for a CLIP text tower: ``[T, dim]`` random rows, the same for the same text."""

    def encode_texts(texts: Sequence[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    return encode_texts


def main(argv: Sequence[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--fcclip-python", type=Path, default=None)
    parser.add_argument("--fcclip-root", type=Path, default=None)
    parser.add_argument("--db-rows", type=int, default=1000)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument(
        "--text",
        choices=("random", "computed"),
        default="random",
        help="text classifiers: random unit rows of their shapes on both sides (the default: "
        "the text towers' outputs do not change the forward's cost, and 150 ADE20k classes × "
        "synonyms × 14 templates through ConvNeXt-L CLIP's text tower take tens of minutes on "
        "one thread) or computed by each side's own code",
    )
    parser.add_argument("--quick", action="store_true", help="the fixtures' reduced FC-CLIP")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats, args.image_size, args.db_rows = "tiny", 1, [48, 64], 100
    reduced = args.size == "tiny"
    absent = missing(args.fcclip_python, args.fcclip_root)
    if absent is not None and not args.quick:
        print(f"bench_fcclip_forward: the original FC-CLIP is missing: {absent}")
        return ""
    set_threads(args.threads)
    if args.text == "random":  # random text embeddings never enter a shared cache
        os.environ["RETCLIP_CACHE_DIR"] = tempfile.mkdtemp(prefix="retclip-bench-")
    else:
        os.environ.setdefault("RETCLIP_CACHE_DIR", tempfile.mkdtemp(prefix="retclip-bench-"))
    image = test_image(*args.image_size)
    vocab = Vocabulary.builtin("ade20k-150")
    with tempfile.TemporaryDirectory(prefix="retclip-bench-fcclip-") as tmp_dir:
        tmp = Path(tmp_dir)
        pth = tmp / "fcclip_random.pth"
        original = None
        if absent is None:
            original = Original(
                args.fcclip_python, args.fcclip_root, pth, args.threads, reduced, args.text
            )
        else:  # --quick without the original: the fixture's weights (original key names)
            from safetensors.torch import load_file

            torch.save({"model": load_file(str(FIXTURE_STATE))}, pth)
        try:
            state = read_checkpoint(pth)
            clip_dir = openclip_folder(state, tmp / "clip", reduced)
            del state
            options: dict[str, Any] = {"fcclip_checkpoint": pth}
            if reduced:  # the reduced head is no released variant: loaded from the .pth
                (tmp / "head.json").write_text(json.dumps(REDUCED_HEAD))
                options["fcclip_config"] = tmp / "head.json"
                conversion = "reduced head loaded from the .pth (original names)"
            else:  # what `retclip convert-fcclip fcclip_random.pth head.safetensors` does
                converted = convert_fcclip(pth, tmp / "head.safetensors", variant="convnext-l")
                options["fcclip_checkpoint"] = tmp / "head.safetensors"
                conversion = f"converted with retclip convert-fcclip ({converted.loaded} keys)"
            model = ModelSpec(backbone=str(clip_dir), proposer="fcclip", device="cpu", **options)
            backbone = model.load_backbone()
            if args.text == "random":  # class and database-label embeddings alike
                backbone.encode_texts = random_text_tower(backbone.dim)
            db = random_database(tmp / "db", backbone, args.db_rows, vocab.names)
            segmenter = build_segmenter(
                PipelineSpec(model=model, db=db), models=(backbone, model.load_proposer(backbone))
            )
            segmenter.class_embeddings(vocab)  # cached per vocabulary, as in a run
            proposer: Any = segmenter.proposer
            targets = [
                ("FC-CLIP proposer", proposer, "propose"),
                ("model forward", proposer.model, "forward"),
                ("scores", segmenter_module, "clip_scores"),
                ("merge", segmenter_module, "merge"),
            ]
            if segmenter.retriever is not None:
                targets.append(("retrieval", segmenter.retriever, "retrieve"))
            ours = segmenter(image, vocab)  # untimed: lazy initialisation
            times: dict[str, list[float]] = {"retclip": [], "FC-CLIP (original)": []}
            segments = {"retclip": len(ours.segments), "FC-CLIP (original)": 0}
            resized = "-"
            if original is not None:
                np.save(tmp / "image.npy", image)
                resized = "×".join(map(str, original.ask(image=str(tmp / "image.npy"))["resized"]))
                original.ask(run=True)  # untimed: lazy initialisation
            timer = StageTimer()
            with timer.patch(targets):
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    segmenter(image, vocab)
                    times["retclip"].append(time.perf_counter() - start)
                    if original is not None:
                        answer = original.ask(run=True)
                        times["FC-CLIP (original)"].append(float(answer["seconds"]))
                        segments["FC-CLIP (original)"] = int(answer["segments"])
            info = original.info if original is not None else {}
        finally:
            if original is not None:
                original.close()
    ours_s = median(times["retclip"])
    rows: list[list[object]] = [
        ["retclip segment --proposer fcclip", ours_s, segments["retclip"], ""]
    ]
    verdict = "not measured (the original is absent: retclip's side only)"
    if times["FC-CLIP (original)"]:
        base = median(times["FC-CLIP (original)"])
        ratio = ours_s / base
        rows.insert(0, ["FC-CLIP forward (original)", base, segments["FC-CLIP (original)"], 1.0])
        rows[1][3] = ratio
        verdict = f"{ratio:.3f}× (target ≤ 1.05×: {'met' if ratio <= 1.05 else 'missed'})"
    table = markdown_table(["per image", "s (median)", "panoptic segments", "× original"], rows)
    n = args.repeats
    k = segmenter.retriever.k if segmenter.retriever is not None else "-"
    stages = markdown_table(
        ["retclip stage", "s/image (mean)"], [[s, timer.seconds.get(s, 0.0) / n] for s in STAGES]
    )
    arch = (
        "reduced (tests/fixtures/fcclip)"
        if reduced
        else "ConvNeXt-L convnext_large_d_320, 250 queries"
    )
    weights = (
        "random weights (the original's build_model after torch.manual_seed(0), its state dict "
        "saved under its key names"
        if info
        else "the fixture's weights (original key names"
    )
    text_note = (
        "computed by each side's text tower"
        if args.text == "computed"
        else "from random text towers (unit rows per synonym; retclip: a seeded row per prompt "
        "for classes and database labels)"
    )
    notes = (
        f"FC-CLIP {arch}, {weights}, {conversion}); {len(vocab)} ADE20k classes; image "
        f"{args.image_size[0]}×{args.image_size[1]} resized to {resized} (short side 800, long "
        f"≤ 1333); {args.threads} thread(s) on both sides; retclip with a database of "
        f"{args.db_rows} random rows (flat index, k = {k}); "
        f"text classifiers {text_note} before timing on both sides; {n} alternating rounds "
        f"after one untimed call each, medians. Original: {json.dumps(info)}. Target: {verdict}."
    )
    return report(
        "FC-CLIP: retclip segment --proposer fcclip vs the original's forward",
        [table, stages],
        results=results_path(args),
        notes=notes,
    )


if __name__ == "__main__":
    main()
