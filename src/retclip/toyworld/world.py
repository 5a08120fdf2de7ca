"""A procedural world of textured "stuff" regions and coloured "thing" shapes.

It lets a new user (and the test suite) watch RetCLIP work with no download: scenes are drawn
from a seed, annotated in COCO panoptic format, and captioned the way web image–text pairs are,
loosely — a caption names what is in the scene, and mentions a colour only now and then, so a
model trained on captions must learn shapes and textures, not colour matching.

Scenes are ``SIZE × SIZE`` RGB images with 1–3 stuff regions (a Voronoi split, each region a
texture in two colours) and 1–4 things (rotated shapes, later ones occluding earlier ones).
Splits draw from disjoint seed streams, so no scene appears in two splits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from retclip.backbones.toy_model import CLASS_WORDS, COLOUR_WORDS

SIZE = 96
THINGS = CLASS_WORDS[:8]
STUFF = CLASS_WORDS[8:]
#: RGB of each colour word the toy model knows.
COLOURS: dict[str, tuple[int, int, int]] = dict(
    zip(
        COLOUR_WORDS,
        [
            (215, 45, 45),
            (240, 140, 35),
            (235, 215, 60),
            (60, 165, 70),
            (60, 200, 210),
            (45, 80, 205),
            (130, 60, 175),
            (235, 130, 190),
            (240, 240, 235),
            (130, 130, 130),
            (25, 25, 30),
            (125, 80, 45),
        ],
        strict=True,
    )
)
SPLITS = ("train", "db", "val")
#: Probability that a caption names an object's colour.
COLOUR_WORD_RATE = 0.2
#: Probability that a caption names the scene's textures at all.
STUFF_WORD_RATE = 0.5


@dataclasses.dataclass
class Scene:
    """One generated scene.

    Attributes:
        image: ``[SIZE, SIZE, 3]`` uint8 RGB.
        segment_ids: ``[SIZE, SIZE]`` int64, 0 only where nothing is (never, in this world).
        segments: ``(segment id, category index into CATEGORIES)`` for every visible segment.
        caption: what a web caption of the scene might say.
    """

    image: np.ndarray
    segment_ids: np.ndarray
    segments: list[tuple[int, int]]
    caption: str


#: Category names in dataset order (things, then stuff); the index is the category id.
CATEGORIES: tuple[str, ...] = THINGS + STUFF


def split_seed(split: str, seed: int) -> np.random.SeedSequence:
    """The seed stream of a split: disjoint across splits for the same ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return np.random.SeedSequence([SPLITS.index(split), seed])


def _texture(kind: str, rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[SIZE, SIZE, 3]`` float texture of ``kind`` in colours ``a`` and ``b``."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "stripes":
        period = rng.uniform(6, 12)
        t = (np.sin(2 * math.pi * u / period) > 0).astype(np.float32)
    elif kind == "dots":
        period = rng.uniform(7, 12)
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        t = (du**2 + dv**2 < (period * 0.3) ** 2).astype(np.float32)
    elif kind == "checks":
        period = rng.uniform(6, 12)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif kind == "noise":
        coarse = rng.random((SIZE // 4, SIZE // 4)).astype(np.float32)
        t = (np.kron(coarse, np.ones((4, 4), np.float32)) > 0.5).astype(np.float32)
    elif kind == "waves":
        period = rng.uniform(8, 14)
        t = (np.sin(2 * math.pi * (v + 3 * np.sin(u / 5)) / period) > 0).astype(np.float32)
    elif kind == "gradient":
        t = np.clip((u - u.min()) / (u.max() - u.min() + 1e-6), 0, 1)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return a * (1 - t[..., None]) + b * t[..., None]


def _polygon(n: int, radius: float, angle: float, star: bool = False) -> list[tuple[float, float]]:
    count = 2 * n if star else n
    points = []
    for i in range(count):
        r = radius * (0.45 if star and i % 2 else 1.0)
        theta = angle + 2 * math.pi * i / count
        points.append((r * math.cos(theta), r * math.sin(theta)))
    return points


def _shape_mask(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """``[SIZE, SIZE]`` bool mask of a shape centred at ``(cx, cy)``."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)

    def poly(points: list[tuple[float, float]]) -> None:
        draw.polygon([(cx + px, cy + py) for px, py in points], fill=255)

    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        inner = radius * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif kind == "square":
        poly(_polygon(4, radius, angle + math.pi / 4))
    elif kind == "diamond":
        poly([(p[0] * 0.65, p[1]) for p in _polygon(4, radius, math.pi / 2)])
    elif kind == "triangle":
        poly(_polygon(3, radius, angle))
    elif kind == "hexagon":
        poly(_polygon(6, radius, angle))
    elif kind == "star":
        poly(_polygon(5, radius, angle, star=True))
    elif kind == "cross":
        arm = radius * 0.33
        bar = [(-radius, -arm), (radius, -arm), (radius, arm), (-radius, arm)]
        c, s = math.cos(angle), math.sin(angle)
        for rect in (bar, [(y, x) for x, y in bar]):
            poly([(x * c - y * s, x * s + y * c) for x, y in rect])
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.asarray(canvas) > 127


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def generate_scene(rng: np.random.Generator) -> Scene:
    """One random scene (see the module docstring)."""
    colour_names = list(COLOURS)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    ids = np.zeros((SIZE, SIZE), np.int64)
    segments: list[tuple[int, int]] = []

    # Stuff: a Voronoi split into 1-3 regions, each a different texture.
    n_stuff = int(rng.integers(1, 4))
    stuff = rng.choice(len(STUFF), size=n_stuff, replace=False)
    seeds = rng.uniform(0, SIZE, size=(n_stuff, 2))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    region = (y[None] - seeds[:, 0, None, None]) ** 2 + (x[None] - seeds[:, 1, None, None]) ** 2
    owner = region.argmin(0)
    for r, kind in enumerate(stuff):
        a, b = palette[rng.choice(len(palette), size=2, replace=False)]
        texture = _texture(STUFF[kind], rng, a, b)
        image[owner == r] = texture[owner == r]
        ids[owner == r] = r + 1
        segments.append((r + 1, len(THINGS) + int(kind)))

    # Things: rotated shapes, later ones on top.
    n_things = int(rng.integers(1, 5))
    thing_words: list[str] = []
    for t in range(n_things):
        kind = int(rng.integers(len(THINGS)))
        colour = int(rng.integers(len(palette)))
        radius = float(rng.uniform(9, 20))
        cx, cy = rng.uniform(radius * 0.6, SIZE - radius * 0.6, size=2)
        mask = _shape_mask(THINGS[kind], cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
        shade = palette[colour] + rng.normal(0, 8, size=3)
        image[mask] = np.clip(shade, 0, 255)
        segment_id = n_stuff + t + 1
        ids[mask] = segment_id
        segments.append((segment_id, kind))
        word = THINGS[kind]
        if rng.random() < COLOUR_WORD_RATE:
            word = f"{colour_names[colour]} {word}"
        thing_words.append(_a(word))

    image = np.clip(image + rng.normal(0, 4, size=image.shape), 0, 255)
    visible = [(sid, cat) for sid, cat in segments if (ids == sid).sum() >= 12]
    ids[~np.isin(ids, [sid for sid, _ in visible])] = 0
    stuff_words = [STUFF[k] for k in stuff]
    rng.shuffle(thing_words)
    caption = f"a photo of {_join(thing_words)}"
    if rng.random() < STUFF_WORD_RATE:
        caption += f" on {_join(stuff_words)}"
    caption += "."
    return Scene(image.astype(np.uint8), ids, visible, caption)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def generate_scenes(split: str, n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes of ``split``; the same arguments always give the same scenes."""
    rng = np.random.default_rng(split_seed(split, seed))
    return [generate_scene(rng) for _ in range(n)]
