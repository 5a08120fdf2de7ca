"""Database sources in their official layouts: Open Images CSVs, webdataset tar shards, and
ADE20k / COCO by name; through the readers and through ``retclip db build``."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from retclip.backbones.color import COLOUR_PROTOTYPES
from retclip.cli import cli
from retclip.database import FeatureDatabase
from retclip.database.sources import items_from_open_images, items_from_shards
from retclip.datasets import CocoPanopticDataset
from retclip.datasets.image_text_shards import expand_braces, read_shard_samples
from retclip.datasets.open_images import OpenImages, read_class_descriptions
from retclip.errors import InputError
from retclip.proposers import MaskProposer, Proposals
from retclip.vocabulary import Vocabulary

#: The colour a label's mask takes in the test images (and the test proposer looks for).
COLOURS = {"apple": "red", "banana": "yellow", "sky": "blue", "grass": "green", "tortoise": "brown"}
LABELS_HEADER = "ImageID,Source,LabelName,Confidence"
BOX_HEADER = (
    "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
    "IsDepiction,IsInside"
)
MIDS = {"/m/014j1m": "Apple", "/m/09qck": "Banana", "/m/01bqvp": "Sky", "/m/08t9c_": "Grass"}


class NamedColourProposer(MaskProposer):
    """A class-prompted proposer for tests: a label's mask is the pixels nearest its colour."""

    name = "test-named-colour"
    gives_class_hints = True

    def propose(self, image, vocabulary, text_embeddings=None) -> Proposals:
        prototypes = np.array(list(COLOUR_PROTOTYPES.values()), dtype=float)
        nearest = ((image.pixels[:, :, None, :] - prototypes) ** 2).sum(-1).argmin(-1)
        masks, hints = [], []
        for i, label in enumerate(vocabulary.names):
            colour = COLOURS.get(label.lower())
            mask = nearest == list(COLOUR_PROTOTYPES).index(colour) if colour else None
            if mask is not None and mask.any():
                masks.append(mask)
                hints.append(i)
        stacked = np.stack(masks) if masks else np.zeros((0, *image.size), bool)
        return Proposals(stacked, np.full(len(masks), 0.9), class_hints=np.array(hints, int))


@pytest.fixture(autouse=True)
def _test_proposer(monkeypatch: pytest.MonkeyPatch) -> None:
    from retclip.proposers.registry import PROPOSERS

    monkeypatch.setitem(PROPOSERS, "test-colour", lambda **_: NamedColourProposer())


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_error(result: Result, *words: str) -> None:
    """Exit 1 with a single ``Error: ...`` line naming each of ``words``, no traceback (and
    nothing else but the progress bar of a build that had begun)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("db build:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


def picture(*labels: str) -> np.ndarray:
    """A 16 x 16k image of one 16-pixel block per label, in its colour (the backbone's grid)."""
    blocks = [np.full((16, 16, 3), COLOUR_PROTOTYPES[COLOURS[x]], np.uint8) for x in labels]
    return np.concatenate(blocks, axis=1)


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], *, compress: bool = False) -> Path:
    """A tar of ``members`` as webdataset's TarWriter writes them (in order, regular files)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def three_samples(prefix: str = "") -> list[tuple[str, bytes]]:
    """img2dataset's members of three samples: a .jpg with .txt and .json, a .png with only a
    .json caption, a .webp with a .txt."""
    meta = {"url": "http://example.com/x", "status": "success"}
    return [
        (f"{prefix}000000000.jpg", encoded(picture("apple", "sky"), "JPEG")),
        (f"{prefix}000000000.txt", b"An apple under a clear sky"),
        (f"{prefix}000000000.json", json.dumps({**meta, "caption": "An apple"}).encode()),
        (f"{prefix}000000001.png", encoded(picture("grass"), "PNG")),
        (f"{prefix}000000001.json", json.dumps({**meta, "caption": "Fresh grass"}).encode()),
        (f"{prefix}000000002.webp", encoded(picture("banana", "sky"), "WEBP")),
        (f"{prefix}000000002.txt", "Bananas, sky — café".encode()),
    ]


def nearest_colours(db: FeatureDatabase) -> list[tuple[str, str]]:
    """(label, the colour its row's feature is nearest) of every row."""
    names = list(COLOUR_PROTOTYPES)
    labels = [db.labels[i].name for i in db.label_ids()]
    return [
        (label, names[n]) for label, n in zip(labels, db.features().argmax(axis=1), strict=True)
    ]


# --- brace patterns ---------------------------------------------------------------------------


def test_brace_patterns_expand_like_webdataset() -> None:
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{9..11}") == ["9", "10", "11"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("s{0..1}-{a,b{x,y}}") == [
        "s0-a",
        "s0-bx",
        "s0-by",
        "s1-a",
        "s1-bx",
        "s1-by",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("a{0..2.tar", "a}0.tar", "a{abc}.tar", "{0..99999999}"):
        with pytest.raises(InputError, match="pattern"):
            expand_braces(bad)


# --- shards -----------------------------------------------------------------------------------


@pytest.mark.parametrize("images", [True, False])
def test_a_shard_reads_as_its_samples(tmp_path, images) -> None:
    shard = write_tar(tmp_path / "00000.tar", three_samples())
    samples = list(read_shard_samples(shard, images=images))
    assert [s.source for s in samples] == [f"{shard}#00000000{i}" for i in range(3)]
    assert [s.captions for s in samples] == [
        ("An apple under a clear sky", "An apple"),
        ("Fresh grass",),
        ("Bananas, sky — café",),
    ]
    members = dict(three_samples())
    for sample in samples:
        assert (sample.data is not None) == images
        assert sample.image.read() == members[sample.image.member]
        if images:
            assert sample.data == members[sample.image.member]
    np.testing.assert_array_equal(samples[1].image.load(), picture("grass"))


def test_a_compressed_shard_streams_but_cannot_be_indexed(tmp_path) -> None:
    shard = write_tar(tmp_path / "00000.tar.gz", three_samples(), compress=True)
    assert [s.key for s in read_shard_samples(shard)] == [f"00000000{i}" for i in range(3)]
    with pytest.raises(InputError, match="gzip-compressed"):
        list(read_shard_samples(shard, images=False))


def test_items_from_shards_follow_the_caption_rule(tmp_path) -> None:
    write_tar(tmp_path / "s" / "00000.tar", three_samples())
    write_tar(tmp_path / "s" / "00001.tar", three_samples("b/"))
    vocabulary = Vocabulary.from_string("apple, banana, sky, grass")
    items = items_from_shards([str(tmp_path / "s" / "{00000..00001}.tar")], vocabulary)
    shard0, shard1 = (str(tmp_path / "s" / f"0000{i}.tar") for i in range(2))
    assert [i.source for i in items] == [
        *(f"{shard0}#00000000{i}" for i in range(3)),
        *(f"{shard1}#b/00000000{i}" for i in range(3)),
    ]
    assert [i.labels for i in items[:3]] == [("apple", "sky"), ("grass",), ("banana", "sky")]
    np.testing.assert_array_equal(items[4].load(), picture("grass"))
    assert len(items_from_shards([shard0, shard1], vocabulary, limit=4)) == 4
    only_grass = items_from_shards([shard0], Vocabulary.from_string("grass, car"))
    assert [i.source for i in only_grass] == [f"{shard0}#000000001"]


def vocab_file(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("apple\nbanana\nsky\ngrass\n")
    return path


def test_db_build_from_shards_and_resume(tmp_path) -> None:
    write_tar(tmp_path / "data" / "00000.tar", three_samples())
    write_tar(tmp_path / "data" / "00001.tar", three_samples("x"))
    pattern = str(tmp_path / "data" / "{00000..00001}.tar")
    base = ["db", "build", tmp_path / "db", "--shards", pattern, "--vocab", vocab_file(tmp_path)]
    base += ["--backbone", "color", "--proposer", "test-colour", "--batch-size", "2"]
    first = run(*base, "--limit", "3")  # an interrupted build, as far as the database knows
    assert first.exit_code == 0, first.output
    assert len(FeatureDatabase.open(tmp_path / "db")) == 5
    rest = run(*base)
    assert rest.exit_code == 0, rest.output
    assert "3 already in the database, skipped" in rest.output
    db = FeatureDatabase.open(tmp_path / "db")
    assert db.rows_per_class() == {"apple": 2, "sky": 4, "grass": 2, "banana": 2}
    assert all(COLOURS[label] == colour for label, colour in nearest_colours(db))
    sources = Counter(db.provenance()["sources"])
    shard1 = str(tmp_path / "data" / "00001.tar")
    assert sources[f"{shard1}#x000000000"] == 2 and sources[f"{shard1}#x000000001"] == 1
    again = run(*base)
    assert again.exit_code == 0 and "added 0 rows" in again.output, again.output
    fresh = run(*[tmp_path / "fresh" if a == tmp_path / "db" else a for a in base])
    assert fresh.exit_code == 0, fresh.output
    other = FeatureDatabase.open(tmp_path / "fresh")
    assert other.provenance()["sources"].tolist() == db.provenance()["sources"].tolist()
    np.testing.assert_array_equal(other.features(), db.features())


def test_bad_shards_are_one_error_line_and_build_nothing(tmp_path) -> None:
    good = write_tar(tmp_path / "good.tar", three_samples())
    members = three_samples()
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        boundary = tar.getmember("000000001.png").offset
    cases = {
        "cut.tar": whole[:boundary],  # ends after the first sample's members, no end marker
        "truncated.tar": whole[: boundary - 100],  # ends inside the first sample's .json
        "garbage.tar": b"not a tar file" * 100,
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    write_tar(tmp_path / "noimage.tar", [m for m in members if m[0] != "000000001.png"])
    write_tar(tmp_path / "badjson.tar", [*members[:4], ("000000001.json", b"{oops"), *members[5:]])
    write_tar(tmp_path / "split.tar", [*members, ("000000000.cls", b"3")])
    corrupt = [("000000000.jpg", b"\xff\xd8 not really a jpeg"), *members[1:]]
    write_tar(tmp_path / "corrupt.tar", corrupt)
    base = ["db", "build", tmp_path / "db", "--vocab", vocab_file(tmp_path)]
    base += ["--backbone", "color", "--proposer", "test-colour"]
    for shard, words in [
        ("cut.tar", ["cut.tar", "truncated", "000000000"]),
        ("truncated.tar", ["truncated.tar", "000000000", "unexpected end of data"]),
        ("garbage.tar", ["garbage.tar"]),
        ("noimage.tar", ["noimage.tar#000000001", "no image"]),
        ("badjson.tar", ["badjson.tar#000000001", "000000001.json"]),
        ("split.tar", ["split.tar#000000000", "not adjacent"]),
        ("missing.tar", ["missing.tar"]),
        ("corrupt.tar", ["corrupt.tar#000000000.jpg"]),  # found when the build decodes it
    ]:
        result = run(*base, "--shards", good, "--shards", tmp_path / shard)
        assert_error(result, *words)
        assert not (tmp_path / "db").exists(), shard
    assert_error(run(*base, "--shards", tmp_path / "{0..1.tar"), "{0..1.tar")
    no_vocab = ["db", "build", tmp_path / "db", "--shards", good, "--backbone", "color"]
    assert_error(run(*no_vocab, "--proposer", "test-colour"), "--shards needs --vocab")
    assert_error(run(*no_vocab, "--proposer", "test-colour", "--images", tmp_path), "--images")
    assert not (tmp_path / "db").exists()


# --- Open Images ------------------------------------------------------------------------------


def open_images_root(tmp_path: Path, *, v7: bool = True) -> Path:
    """An Open Images download: class descriptions (V7 with a header, or V6 boxable without),
    the image-level labels and the boxes of the train split, and four of its five images."""
    root = tmp_path / "oi"
    annotations = root / "annotations"
    annotations.mkdir(parents=True)
    rows = [f"{mid},{name}" for mid, name in MIDS.items()]
    if v7:
        (annotations / "oidv7-class-descriptions.csv").write_text(
            "\n".join(["LabelName,DisplayName", *rows, "/m/09dzg,Tortoise"]) + "\n"
        )
    else:
        (annotations / "class-descriptions-boxable.csv").write_text("\n".join(rows) + "\n")
    (annotations / "oidv7-train-annotations-human-imagelabels.csv").write_text(
        "\n".join(
            [
                LABELS_HEADER,
                "000002b66c9c498e,verification,/m/014j1m,1",
                "000002b66c9c498e,crowdsource-verification,/m/01bqvp,1",
                "000002b66c9c498e,verification,/m/09qck,0",  # verified absent
                "000002b97e5471a0,verification,/m/08t9c_,1",
                "000002c707c9895e,verification,/m/09qck,1",
                "000002c707c9895e,verification,/m/01bqvp,1",
                "00000b4dcff7f799,verification,/m/014j1m,0",  # nothing left
                "00000bd6f4a7e2a5,verification,/m/014j1m,1",  # not downloaded
            ]
        )
        + "\n"
    )
    (annotations / "oidv6-train-annotations-bbox.csv").write_text(
        "\n".join(
            [
                BOX_HEADER,
                "000002b66c9c498e,xclick,/m/01bqvp,1,0.0,1.0,0.5,1.0,0,0,0,0,0",
                "000002b66c9c498e,xclick,/m/014j1m,1,0.0,0.5,0.0,0.5,0,0,0,0,0",
                "000002b66c9c498e,xclick,/m/014j1m,1,0.5,1.0,0.0,0.5,1,0,0,0,0",
                "000002b97e5471a0,activemil,/m/08t9c_,1,0.0,1.0,0.0,1.0,0,1,1,0,0",
            ]
        )
        + "\n"
    )
    images = root / "train"
    images.mkdir()
    for image_id, labels in {
        "000002b66c9c498e": ("apple", "sky"),
        "000002b97e5471a0": ("grass",),
        "000002c707c9895e": ("banana", "sky"),
        "00000b4dcff7f799": ("apple",),
    }.items():
        Image.fromarray(picture(*labels)).save(images / f"{image_id}.jpg", quality=95)
    return root


@pytest.mark.parametrize("v7", [True, False])
def test_open_images_labels_and_boxes(tmp_path, v7) -> None:
    root = open_images_root(tmp_path, v7=v7)
    if not v7:  # V6's boxable descriptions lack the classes of the V7 rows here: tortoise
        assert read_class_descriptions(OpenImages(root).descriptions) == MIDS
    labels = OpenImages(root)
    assert list(labels.image_labels()) == [
        ("000002b66c9c498e", ("Apple", "Sky")),
        ("000002b97e5471a0", ("Grass",)),
        ("000002c707c9895e", ("Banana", "Sky")),
        ("00000bd6f4a7e2a5", ("Apple",)),
    ]
    items, absent = items_from_open_images(labels)
    assert absent == 1
    assert [(Path(i.source).name, i.labels) for i in items] == [
        ("000002b66c9c498e.jpg", ("Apple", "Sky")),
        ("000002b97e5471a0.jpg", ("Grass",)),
        ("000002c707c9895e.jpg", ("Banana", "Sky")),
    ]
    boxes = OpenImages(root, annotations="boxes")
    assert list(boxes.image_labels()) == [
        ("000002b66c9c498e", ("Sky", "Apple")),
        ("000002b97e5471a0", ("Grass",)),
    ]
    vocabulary = Vocabulary.from_string("heavens|sky, grass")  # by synonym, case-insensitive
    restricted, _ = items_from_open_images(labels, vocabulary=vocabulary, limit=2)
    assert [(Path(i.source).stem, i.labels) for i in restricted] == [
        ("000002b66c9c498e", ("heavens",)),
        ("000002b97e5471a0", ("grass",)),
    ]


def test_open_images_are_streamed_up_to_the_limit(tmp_path) -> None:
    root = open_images_root(tmp_path)
    csv_file = root / "annotations" / "oidv7-train-annotations-human-imagelabels.csv"
    with csv_file.open("a") as file:
        file.write("ffff000000000000,verification,/m/0nosuch,1\n")  # line 10
    items, _ = items_from_open_images(OpenImages(root), limit=2)  # never reads line 10
    assert len(items) == 2
    with pytest.raises(InputError, match=r"line 10: unknown class '/m/0nosuch'"):
        items_from_open_images(OpenImages(root))


def test_db_build_from_open_images(tmp_path) -> None:
    root = open_images_root(tmp_path)
    base = ["db", "build", tmp_path / "db", "--open-images", root, "--backbone", "color"]
    result = run(*base, "--proposer", "test-colour")
    assert result.exit_code == 0, result.output
    assert "1 labelled images are not in" in result.output
    db = FeatureDatabase.open(tmp_path / "db")
    assert db.rows_per_class() == {"Apple": 1, "Sky": 2, "Grass": 1, "Banana": 1}
    assert all(COLOURS[label.lower()] == colour for label, colour in nearest_colours(db))
    assert set(db.provenance()["sources"]) == {
        str(root / "train" / f"{i}.jpg")
        for i in ("000002b66c9c498e", "000002b97e5471a0", "000002c707c9895e")
    }
    # boxes, restricted to a vocabulary file, with the images somewhere else
    elsewhere = tmp_path / "downloads"
    shutil.copytree(root / "train", elsewhere)
    (tmp_path / "classes.txt").write_text("sky\napple\n")
    restricted = run(
        "db", "build", tmp_path / "db2", "--open-images", root, "--images", elsewhere,
        "--open-images-annotations", "boxes", "--classes-from", tmp_path / "classes.txt",
        "--backbone", "color", "--proposer", "test-colour",
    )  # fmt: skip
    assert restricted.exit_code == 0, restricted.output
    db2 = FeatureDatabase.open(tmp_path / "db2")
    assert db2.rows_per_class() == {"apple": 1, "sky": 1}
    assert set(db2.provenance()["sources"]) == {str(elsewhere / "000002b66c9c498e.jpg")}


def test_bad_open_images_are_one_error_line_and_build_nothing(tmp_path) -> None:
    root = open_images_root(tmp_path)
    annotations = root / "annotations"
    labels_csv = annotations / "oidv7-train-annotations-human-imagelabels.csv"
    good = labels_csv.read_text()
    base = ["db", "build", tmp_path / "db", "--open-images", root, "--backbone", "color"]
    base += ["--proposer", "test-colour"]
    lines = good.splitlines()
    for text, words in [
        (good.replace(",Confidence", ",Score"), [labels_csv.name, "line 1", "Confidence"]),
        (good.replace("/m/08t9c_", "/m/0zzzz"), [labels_csv.name, "line 5", "/m/0zzzz"]),
        (good.replace("/m/09qck,1", "/m/09qck,yes"), [labels_csv.name, "line 6", "yes"]),
        ("\n".join([*lines, lines[1]]) + "\n", [labels_csv.name, "line 10", "not adjacent"]),
        ("\n".join([*lines, "000002b66c9c49"]) + "\n", [labels_csv.name, "line 10", "fields"]),
    ]:
        labels_csv.write_text(text)
        assert_error(run(*base), *words)
        assert not (tmp_path / "db").exists()
    labels_csv.write_text(good)
    descriptions = annotations / "oidv7-class-descriptions.csv"
    descriptions.write_text("LabelName,DisplayName\n/m/014j1m,Apple\nSky\n")
    assert_error(run(*base), descriptions.name, "line 3", "MID,DisplayName")
    descriptions.unlink()
    assert_error(run(*base), "class-descriptions")
    (annotations / "class-descriptions-boxable.csv").write_text("/m/014j1m,Apple\n")
    assert_error(run(*base, "--open-images-split", "validation"), "validation")
    boxable = annotations / "train-annotations-human-imagelabels-boxable.csv"
    shutil.copy(labels_csv, boxable)
    assert_error(run(*base), "several", "--open-images-annotations")
    assert_error(run(*base, "--open-images-annotations", tmp_path / "none.csv"), "none.csv")
    boxable.unlink()
    (annotations / "class-descriptions-boxable.csv").write_text(
        "\n".join(f"{mid},{name}" for mid, name in MIDS.items()) + "\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(run(*base, "--images", empty, "--open-images-annotations", labels_csv), "empty")
    assert_error(run(*base[:-2], "--classes-from", "ade20k-150"), "--proposer")
    assert_error(run(*base, "--labels", labels_csv), "exactly one source")
    coco = ["db", "build", tmp_path / "db", "--backbone", "color", "--classes-from", "x"]
    assert_error(run(*coco, "--labels", labels_csv, "--images", root), "--classes-from")
    assert not (tmp_path / "db").exists()


# --- ADE20k / COCO by name --------------------------------------------------------------------


def dataset_layouts(scenes, tmp_path: Path) -> dict[str, Path]:
    """The database scenes as an ADEChallengeData2016 and a COCO folder, train split."""
    json_path, images = scenes["db"]
    ade = tmp_path / "ADEChallengeData2016"
    shutil.copytree(images, ade / "images" / "training")
    shutil.copytree(json_path.with_suffix(""), ade / "ade20k_panoptic_train")
    shutil.copy(json_path, ade / "ade20k_panoptic_train.json")
    coco = tmp_path / "coco"
    shutil.copytree(images, coco / "train2017")
    shutil.copytree(json_path.with_suffix(""), coco / "panoptic_train2017")
    (coco / "annotations").mkdir()
    shutil.copy(json_path, coco / "annotations" / "panoptic_train2017.json")
    return {"ade20k": ade, "coco": coco}


def test_db_build_from_ade20k_and_coco_by_name(scenes, tmp_path) -> None:
    dataset = CocoPanopticDataset(*scenes["db"])
    segments: Counter[str] = Counter()
    for i in range(len(dataset)):
        ann = dataset.annotation(i)
        names = dataset.vocabulary.names
        segments.update(names[c] for c in ann.categories[~ann.iscrowd])
    for kind, root in dataset_layouts(scenes, tmp_path).items():
        db_path = tmp_path / f"{kind}_db"
        base = ["db", "build", db_path, "--dataset", kind, "--root", root, "--split"]
        result = run(*base, "train", "--backbone", "color")
        assert result.exit_code == 0, result.output
        assert FeatureDatabase.open(db_path).rows_per_class() == dict(segments)
        tags = run(*base, "train", "--backbone", "color", "--proposer", "test-colour")
        assert tags.exit_code == 0, tags.output
        tagged = FeatureDatabase.open(db_path)  # the same database, grown by rows of its tags
        provenance, ids = tagged.provenance(), tagged.label_ids()
        added = range(sum(segments.values()), len(tagged))
        assert len(added) > 0 and len(set(provenance["build_ids"][i] for i in added)) == 1
        for i in added:
            image = dataset.index_of(provenance["sources"][i])  # by file stem
            assert tagged.labels[ids[i]].name in dataset.image_labels(image)
        assert_error(run(*base, "val", "--backbone", "color"), "val")
    assert_error(
        run("db", "build", tmp_path / "x", "--dataset", "coco", "--backbone", "color"), "--root"
    )
    assert not (tmp_path / "x").exists()
