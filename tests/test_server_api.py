"""The HTTP API of ``retclip serve``: every endpoint and each bad-input case (offline)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from retclip import Segmenter
from retclip.proposers import load_proposer
from retclip.proposers.base import MaskProposer, Proposals
from retclip.server import ServerConfig, create_app
from retclip.toyworld.world import generate_scenes

CLASSES = "circle, square, star, triangle, stripes, dots, checks"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def scenes() -> list[np.ndarray]:
    return [scene.image for scene in generate_scenes("val", 4, seed=3)]


def local_client(app: Any, **options: Any) -> TestClient:
    """A test client addressed as a local browser would (the server refuses other hosts)."""
    return TestClient(app, base_url="http://127.0.0.1", **options)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("serve"), backbones=("toy", "color"))
    with local_client(create_app(config)) as test_client:
        yield test_client


def segment(client: TestClient, image: np.ndarray, **fields: str) -> httpx.Response:
    data = {"classes": CLASSES, **fields}
    return client.post("/segment", files={"image": ("scene.png", png(image))}, data=data)


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str) and message
    assert "Traceback" not in message
    return message


def test_health_and_models(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and "segmented_images" in health["counters"]
    models = client.get("/models").json()
    assert [b["name"] for b in models["backbones"]] == ["toy", "color"]
    assert models["backbones"][0]["default"] and models["proposers"][0]["name"] == "regions"
    assert "ade20k-150" in models["vocabularies"]
    assert client.get("/").status_code == 200 and "retclip" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200


def test_segment_matches_the_segmenter(client: TestClient, scenes: list[np.ndarray]) -> None:
    response = segment(client, scenes[0], gamma="0.3")
    assert response.status_code == 200, response.text
    body = response.json()
    expected = Segmenter("toy", load_proposer("regions"), device="cpu")(scenes[0], CLASSES)
    assert [s["category_name"] for s in body["segments"]] == [
        expected.label_of(s) for s in expected.segments
    ]
    for got, want in zip(body["segments"], expected.segments, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert got["s_clip"] == pytest.approx(
            float(expected.scores.s_clip[want.mask_index, want.category]), abs=1e-5
        )
        assert got["s_ret"] is None and got["bbox"] == list(want.bbox)
        assert got["rle"]["size"] == [96, 96] and got["area"] == want.area
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    panoptic = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["panoptic_png"]))))
    assert overlay.size == (96, 96)
    ids = panoptic[..., 0] + 256 * panoptic[..., 1].astype(int)
    assert set(np.unique(ids)) - {0} == {s["id"] for s in body["segments"]}
    assert body["classes"] == [c.strip() for c in CLASSES.split(",")]


def test_builtin_vocabulary_and_url_images(client: TestClient, scenes: list[np.ndarray]) -> None:
    response = client.post(
        "/segment",
        files={"image": ("x.png", png(scenes[1]))},
        data={"vocab": "ade20k-150", "images": "url"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["classes"]) == 150 and "overlay_png" not in body
    fetched = client.get(body["overlay_url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert client.get(body["panoptic_url"]).status_code == 200


def test_rescore_needs_no_model_pass(client: TestClient, scenes: list[np.ndarray]) -> None:
    body = segment(client, scenes[2]).json()
    before = client.get("/health").json()["counters"]
    strict = client.post("/rescore", json={"result_id": body["result_id"], "score_threshold": 1.0})
    assert strict.status_code == 200, strict.text
    assert strict.json()["segments"] == [] and strict.json()["settings"]["score_threshold"] == 1.0
    back = client.post("/rescore", json={"result_id": body["result_id"], "score_threshold": 0.0})
    assert [s["category_name"] for s in back.json()["segments"]] == [
        s["category_name"] for s in body["segments"]
    ]
    after = client.get("/health").json()["counters"]
    assert after["segmented_images"] == before["segmented_images"]
    assert after["backbone_passes"] == before["backbone_passes"]
    assert after["rescored"] == before["rescored"] + 2


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"classes": ""}, 400, "exactly one of"),
        ({"vocab": "ade20k-150"}, 400, "exactly one of"),
        ({"classes": "", "vocab": "imagenet"}, 400, "unknown vocabulary"),
        ({"classes": "a, , b"}, 400, "empty name"),
        ({"alpha": "1.5"}, 400, "alpha must lie in [0, 1]"),
        ({"gamma": "nan"}, 400, "gamma must lie"),
        ({"gamma": "lots"}, 422, "'gamma'"),
        ({"combine": "max"}, 422, "'combine'"),
        ({"images": "jpeg"}, 422, "'images'"),
        ({"backbone": "clip-l14"}, 400, "unknown backbone 'clip-l14'"),
        ({"proposer": "grounded-sam"}, 400, "unknown proposer 'grounded-sam'"),
        ({"db": "../../etc"}, 400, "invalid database name"),
        ({"db": "missing"}, 404, "no database named 'missing'"),
    ],
)
def test_segment_bad_fields(
    client: TestClient, scenes: list[np.ndarray], fields: dict[str, str], status: int, words: str
) -> None:
    assert words in error_of(segment(client, scenes[0], **fields), status)


def test_segment_bad_images(client: TestClient) -> None:
    def post(content: bytes) -> httpx.Response:
        return client.post("/segment", files={"image": ("up.jpg", content)}, data={"classes": "a"})

    assert "'up.jpg' is empty" in error_of(post(b""), 400)
    assert "not a recognised image" in error_of(post(b"GIF89a not really"), 400)
    truncated = png(np.zeros((40, 40, 3), np.uint8))[:60]
    assert "'up.jpg'" in error_of(post(truncated), 400)
    assert "'image'" in error_of(client.post("/segment", data={"classes": "a"}), 422)


def test_rescore_bad_input(client: TestClient, scenes: list[np.ndarray]) -> None:
    result_id = segment(client, scenes[0]).json()["result_id"]
    assert "no result with id" in error_of(client.post("/rescore", json={"result_id": "x"}), 404)
    bad = client.post("/rescore", json={"result_id": result_id, "gamma": 2})
    assert "gamma must lie in [0, 1]" in error_of(bad, 400)
    assert "'colour'" in error_of(
        client.post("/rescore", json={"result_id": "a", "colour": 1}), 422
    )
    assert "'result_id'" in error_of(client.post("/rescore", json={}), 422)
    assert error_of(client.post("/rescore", content=b"{", headers={"content-type": "x"}), 422)
    assert "no result" in error_of(client.get("/results/nope/overlay.png"), 404)


def test_database_lifecycle(client: TestClient, scenes: list[np.ndarray]) -> None:
    created = client.post("/databases", json={"name": "shapes"})
    assert created.status_code == 201 and created.json()["rows"] == 0
    assert created.json()["path"] == "shapes"  # no absolute server path is shown
    assert "already exists" in error_of(client.post("/databases", json={"name": "shapes"}), 409)
    full = np.ones((96, 96), np.uint8) * 255
    added = client.post(
        "/databases/shapes/rows",
        files=[
            ("images", ("a.png", png(scenes[0]))),
            ("images", ("b.png", png(scenes[1]))),
            ("masks", ("a_mask.png", png(full))),
            ("masks", ("b_mask.png", png(full[:, :, None].repeat(3, 2)))),
        ],
        data={"labels": ["hexagon", "ring"]},
    )
    assert added.status_code == 200, added.text
    assert added.json()["added_rows"] == 2
    assert added.json()["database"]["rows_per_class"] == {"hexagon": 1, "ring": 1}
    whole = client.post(
        "/databases/shapes/rows",
        files=[("images", ("c.png", png(scenes[2])))],
        data={"labels": "hexagon"},
    )
    assert whole.json()["database"]["rows_per_class"] == {"hexagon": 2, "ring": 1}
    listed = client.get("/databases").json()["databases"]
    assert [(d["name"], d["rows"]) for d in listed] == [("shapes", 3)]
    # retrieval-only: the database holds only hexagons and rings, so every segment is one of them
    retrieved = segment(client, scenes[3], db="shapes", gamma="1", classes="hexagon, ring, star")
    assert retrieved.status_code == 200, retrieved.text
    labels = {s["category_name"] for s in retrieved.json()["segments"]}
    assert labels and labels <= {"hexagon", "ring"}
    assert all(s["s_ret"] is not None for s in retrieved.json()["segments"])
    removed = client.delete("/databases/shapes/classes/ring")
    assert removed.status_code == 200 and removed.json()["removed_rows"] == 1
    info = client.get("/databases/shapes").json()
    assert info["rows_per_class"] == {"hexagon": 2}
    after = segment(client, scenes[3], db="shapes", gamma="1", classes="hexagon, ring, star")
    assert {s["category_name"] for s in after.json()["segments"]} == {"hexagon"}
    assert "unknown class" in error_of(client.delete("/databases/shapes/classes/ring"), 400)
    assert client.delete("/databases/shapes").json() == {"deleted": "shapes"}
    assert "no database" in error_of(client.get("/databases/shapes"), 404)
    assert "no database" in error_of(client.delete("/databases/shapes"), 404)


def test_add_rows_bad_input(client: TestClient, scenes: list[np.ndarray]) -> None:
    image = ("images", ("a.png", png(scenes[0])))

    def add(name: str, files: list, **data: object) -> httpx.Response:
        return client.post(f"/databases/{name}/rows", files=files, data=data)

    assert "invalid database name" in error_of(add(".hidden", [image], labels="x"), 400)
    assert "invalid database name" in error_of(add("a..b", [image], labels="x"), 400)
    assert "'labels'" in error_of(add("d", [image]), 422)
    assert "empty label" in error_of(add("d", [image], labels=" "), 400)
    two = [image, ("images", ("b.png", png(scenes[1])))]
    assert "3 labels for 2 images" in error_of(add("d", two, labels=["a", "b", "c"]), 400)
    assert "1 masks for 2 images" in error_of(
        add("d", [*two, ("masks", ("m.png", png(np.ones((96, 96), np.uint8))))], labels="a"), 400
    )
    small = ("masks", ("m.png", png(np.ones((10, 10), np.uint8))))
    assert "expected the same size" in error_of(add("d", [image, small], labels="a"), 400)
    empty = ("masks", ("m.png", png(np.zeros((96, 96), np.uint8))))
    assert "mask 'm.png' is empty" in error_of(add("d", [image, empty], labels="a"), 400)
    assert "no class per mask" in error_of(add("d", [image], labels="a", use_proposer="true"), 400)
    assert "no database" in error_of(add("d", [image], labels="a", create="false"), 404)
    assert "not a recognised image" in error_of(
        add("d", [("images", ("x", b"xx"))], labels="a"), 400
    )
    assert "'images'" in error_of(add("d", [], labels="a"), 422)
    assert "unknown backbone" in error_of(add("d", [image], labels="a", backbone="rn50x64"), 400)
    assert "no database" in error_of(client.delete("/databases/d/classes/a"), 404)
    assert "'name'" in error_of(client.post("/databases", json={}), 422)
    assert "invalid database name" in error_of(client.post("/databases", json={"name": "a/b"}), 400)
    assert client.get("/databases").json()["databases"] == []  # nothing was created
    # a database of one backbone refuses rows computed with another
    assert add("c", [image], labels="a", backbone="color").status_code == 200
    assert "holds features of backbone 'color'" in error_of(
        add("c", [image], labels="a", backbone="toy"), 409
    )
    assert "was built with backbone" in error_of(segment(client, scenes[0], db="c"), 409)
    client.delete("/databases/c")


def test_limits(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    config = ServerConfig(
        data_dir=tmp_path, max_upload_bytes=40_000, max_image_pixels=90 * 90, max_classes=3
    )
    with local_client(create_app(config)) as small:
        big = png(np.random.default_rng(0).integers(0, 255, (150, 150, 3), dtype=np.uint8))
        response = small.post("/segment", files={"image": ("big.png", big)}, data={"classes": "a"})
        assert "upload limit of 40000 bytes" in error_of(response, 413)
        assert "the limit is 8100 pixels" in error_of(segment(small, scenes[0], classes="a"), 413)
        tiny = scenes[0][:80, :80].copy()
        assert "the limit is 3" in error_of(segment(small, tiny, classes="a, b, c, d"), 400)
        assert segment(small, tiny, classes="a, b, c").status_code == 200


def test_token_guards_writes(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    with local_client(create_app(ServerConfig(data_dir=tmp_path, token="s3cret"))) as guarded:
        files = [("images", ("a.png", png(scenes[0])))]
        denied = guarded.post("/databases/t/rows", files=files, data={"labels": "x"})
        assert "Bearer" in error_of(denied, 401)
        assert denied.headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer nope"}
        assert error_of(guarded.post("/databases", json={"name": "t"}, headers=wrong), 401)
        assert error_of(guarded.delete("/databases/t", headers=wrong), 401)
        assert error_of(guarded.delete("/databases/t/classes/x"), 401)
        ok = {"Authorization": "Bearer s3cret"}
        added = guarded.post("/databases/t/rows", files=files, data={"labels": "x"}, headers=ok)
        assert added.status_code == 200, added.text
        assert segment(guarded, scenes[0], db="t").status_code == 200  # reads need no token
        assert guarded.get("/databases/t").status_code == 200


class _GatedProposer(MaskProposer):
    """Whole-image proposals, released one by one by a test; or raises an internal error."""

    name = "gated"

    def __init__(self, fail: bool = False) -> None:
        self.gate = threading.Semaphore(0)
        self.fail = fail

    def propose(self, image: Any, vocabulary: Any, text_embeddings: Any = None) -> Proposals:
        if self.fail:
            raise RuntimeError("secret internal detail /home/user/model.bin")
        self.gate.acquire(timeout=30)
        return Proposals(masks=np.ones((1, *image.size), bool), scores=np.ones(1))


def test_internal_error_shows_no_traceback(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    app = create_app(
        ServerConfig(data_dir=tmp_path), extra_proposers={"broken": _GatedProposer(True)}
    )
    with local_client(app, raise_server_exceptions=False) as broken:
        message = error_of(segment(broken, scenes[0], proposer="broken"), 500)
        assert "internal server error" in message and "secret" not in message


def test_queue_full_and_timeout(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    gated = _GatedProposer()
    config = ServerConfig(data_dir=tmp_path, max_queue=1, max_batch=1, timeout_s=5)
    app = create_app(config, extra_proposers={"gated": gated})
    data = {"classes": "a", "proposer": "gated"}

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:

                async def post() -> httpx.Response:
                    files = {"image": ("a.png", png(scenes[0]))}
                    return await http.post("/segment", files=files, data=data)

                first = asyncio.create_task(post())  # taken by the worker, blocks in the proposer
                while app.state.dispatcher_running() == 0:
                    await asyncio.sleep(0.01)
                second = asyncio.create_task(post())  # waits in the queue
                while app.state.queue_depth() == 0:
                    await asyncio.sleep(0.01)
                third = await post()  # the queue is full
                gated.gate.release(2)
                return [await first, await second, third]

    first, second, third = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert "server busy" in error_of(third, 503) and third.headers["retry-after"] == "1"

    slow = create_app(
        ServerConfig(data_dir=tmp_path, timeout_s=0.2), extra_proposers={"gated": gated}
    )
    with local_client(slow) as client:
        assert "did not finish within 0.2 s" in error_of(segment(client, scenes[0], **data), 504)
        gated.gate.release()


def test_concurrent_writes_lose_no_rows(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path, max_concurrency=2))

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:

                async def add(i: int) -> httpx.Response:
                    files = [("images", (f"{i}.png", png(scenes[i % 4])))]
                    return await http.post(
                        "/databases/shared/rows", files=files, data={"labels": f"class{i % 3}"}
                    )

                return list(await asyncio.gather(*(add(i) for i in range(8))))

    responses = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    with local_client(app) as client:
        info = client.get("/databases/shared").json()
    assert info["rows"] == 8 and info["rows_per_class"] == {"class0": 3, "class1": 3, "class2": 2}


def test_server_config_is_validated(tmp_path: Path) -> None:
    from retclip.errors import InputError

    for bad, message in [
        ({"max_queue": 0}, "max_queue"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"backbones": ()}, "backbones"),
        ({"proposers": ("gt",)}, "cannot be served"),
        ({"token": ""}, "token"),
        ({"max_batch": "four"}, "max_batch"),
        ({"unknown_option": 1}, "unknown_option"),
    ]:
        with pytest.raises(InputError, match=message):
            ServerConfig(data_dir=tmp_path, **bad)


def test_segments_are_the_records_of_the_result_files(client: TestClient, scenes) -> None:
    body = segment(client, scenes[0]).json()
    record_keys = {"id", "category_id", "category_name", "isthing", "iscrowd", "area", "bbox"}
    for item in body["segments"]:
        extra = {"score", "s_clip", "s_ret", "s_iv", "color", "rle", "label_point", "neighbours"}
        assert record_keys | extra == set(item)
        x, y = item["label_point"]  # inside its own segment
        assert decode_rle(item["rle"])[y, x]
        assert item["neighbours"] == []  # no database: no retrieval


def decode_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_util

    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_each_segment_carries_the_rows_behind_its_s_ret(client: TestClient, scenes) -> None:
    files = [("images", (f"ex{i}.png", png(scene))) for i, scene in enumerate(scenes[1:3])]
    added = client.post("/databases/evidence/rows", files=files, data={"labels": "circle"})
    assert added.status_code == 200, added.text
    body = segment(client, scenes[0], db="evidence").json()
    assert body["segments"]
    for item in body["segments"]:
        neighbours = item["neighbours"]
        assert 1 <= len(neighbours) <= 2  # two rows in the database
        assert {n["label"] for n in neighbours} == {"circle"}
        assert {n["source"] for n in neighbours} <= {"ex0.png", "ex1.png"}  # names, no paths
        sims = [n["similarity"] for n in neighbours]
        assert sims == sorted(sims, reverse=True) and all(-1.0 <= v <= 1.0001 for v in sims)
    client.delete("/databases/evidence")


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    pixels = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_413_as_images_and_as_masks(
    client: TestClient, scenes: list[np.ndarray]
) -> None:
    bomb = bomb_png(60000, 60000)
    answer = client.post("/segment", files={"image": ("bomb.png", bomb)}, data={"classes": "a"})
    assert "more pixels than PIL will decode" in error_of(answer, 413)
    rows = client.post(
        "/databases/bombs/rows", files=[("images", ("bomb.png", bomb))], data={"labels": "a"}
    )
    assert "pixels" in error_of(rows, 413)
    as_mask = client.post(
        "/databases/bombs/rows",
        files=[("images", ("a.png", png(scenes[0]))), ("masks", ("m.png", bomb))],
        data={"labels": "a"},
    )
    assert "pixels" in error_of(as_mask, 413)
    big_mask = bomb_png(4000, 4000)  # allowed as an image, but not the size of this one
    wrong = client.post(
        "/databases/bombs/rows",
        files=[("images", ("a.png", png(scenes[0]))), ("masks", ("m.png", big_mask))],
        data={"labels": "a"},
    )
    assert "pixels" in error_of(wrong, 413)


def test_cross_origin_writes_and_foreign_hosts_are_refused(
    tmp_path: Path, scenes: list[np.ndarray]
) -> None:
    app = create_app(ServerConfig(data_dir=tmp_path))
    files = [("images", ("a.png", png(scenes[0])))]
    with local_client(app) as local:
        evil = {"Origin": "http://evil.example"}
        refused = local.post("/databases/t/rows", files=files, data={"labels": "x"}, headers=evil)
        assert "cross-origin write" in error_of(refused, 403)
        assert error_of(local.post("/databases", json={"name": "t"}, headers=evil), 403)
        assert local.get("/databases", headers=evil).status_code == 200  # reads are fine
        same = {"Origin": "http://127.0.0.1"}  # the server's own page
        made = local.post("/databases", json={"name": "t"}, headers=same)
        assert made.status_code == 201, made.text
    with TestClient(app, base_url="http://attacker.example") as rebound:  # DNS rebinding
        assert "--allow-host" in error_of(rebound.get("/health"), 400)
    allowing = ServerConfig(
        data_dir=tmp_path / "b",
        allowed_hosts=("seg.lab.example",),
        allowed_origins=("https://tools.lab.example",),
    )
    with TestClient(create_app(allowing), base_url="http://seg.lab.example") as lab:
        ok = lab.post(
            "/databases", json={"name": "u"}, headers={"Origin": "https://tools.lab.example"}
        )
        assert ok.status_code == 201, ok.text


def test_a_database_changed_outside_the_server_is_reopened(
    tmp_path: Path, scenes: list[np.ndarray]
) -> None:
    from retclip.database import FeatureDatabase

    with local_client(create_app(ServerConfig(data_dir=tmp_path))) as client:
        files = [("images", ("a.png", png(scenes[0]))), ("images", ("b.png", png(scenes[1])))]
        added = client.post("/databases/live/rows", files=files, data={"labels": ["x", "y"]})
        assert added.status_code == 200, added.text
        assert segment(client, scenes[0], db="live").status_code == 200  # opened and cached
        outside = FeatureDatabase.open(tmp_path / "databases" / "live")  # `retclip db` elsewhere
        outside.remove_classes(["x"])  # compacts: the shard the server read is gone
        answer = segment(client, scenes[0], db="live")
        assert answer.status_code == 200, answer.text
        assert client.get("/databases/live").json()["rows"] == 1
        outside = FeatureDatabase.open(tmp_path / "databases" / "live")
        outside.add(np.eye(outside.dim, dtype=np.float32)[:2], ["z", "z"], sources=["p", "q"])
        assert client.get("/databases/live").json()["rows"] == 3  # added rows appear


def test_error_bodies_carry_no_server_paths(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    with local_client(create_app(ServerConfig(data_dir=tmp_path))) as client:
        files = [("images", ("a.png", png(scenes[0])))]
        assert (
            client.post("/databases/d/rows", files=files, data={"labels": "x"}).status_code == 200
        )
        (tmp_path / "databases" / "d" / "meta.json").write_text("{ broken")
        for answer in (segment(client, scenes[0], db="d"), client.get("/databases/d")):
            message = answer.json()["error"]
            assert answer.status_code >= 400 and str(tmp_path) not in message, message


def test_a_chunked_oversized_body_is_413(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    config = ServerConfig(data_dir=tmp_path, max_upload_bytes=40_000)
    body = b"".join(
        [
            b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n',
            b"Content-Type: image/png\r\n\r\n",
            png(np.random.default_rng(1).integers(0, 255, (150, 150, 3), dtype=np.uint8)),
            b"\r\n--xyz--\r\n",
        ]
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent with Transfer-Encoding: chunked
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    with local_client(create_app(config)) as small:
        response = small.post(
            "/segment",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
        assert "content-length" not in response.request.headers
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert "upload limit of 40000 bytes" in error_of(response, 413)


def test_work_per_request_is_bounded_by_masks_times_classes(
    tmp_path: Path, scenes: list[np.ndarray]
) -> None:
    config = ServerConfig(data_dir=tmp_path, max_mask_class_pairs=20)
    with local_client(create_app(config)) as bounded:
        many = segment(bounded, scenes[0], classes=", ".join(f"class {i}" for i in range(40)))
        message = error_of(many, 413)
        assert "x 40 classes" in message and "the limit is 20 per image" in message
        assert bounded.get("/health").json()["counters"]["segmented_images"] == 0
        assert segment(bounded, scenes[0], classes="circle").status_code == 200
        assert bounded.get("/models").json()["limits"]["max_mask_class_pairs"] == 20


def test_work_of_a_timed_out_request_is_stopped(tmp_path: Path, scenes: list[np.ndarray]) -> None:
    gated = _GatedProposer()
    config = ServerConfig(data_dir=tmp_path, timeout_s=0.2)
    with local_client(create_app(config, extra_proposers={"gated": gated})) as client:
        late = segment(client, scenes[0], classes="a", proposer="gated")
        assert "did not finish within 0.2 s" in error_of(late, 504)
        gated.gate.release()  # the proposer returns; the backbone pass and scoring never run
        for _ in range(200):
            counters = client.get("/health").json()["counters"]
            if counters["cancelled_jobs"]:
                break
            threading.Event().wait(0.02)
        assert counters["cancelled_jobs"] == 1
        assert counters["segmented_images"] == counters["backbone_passes"] == 0
