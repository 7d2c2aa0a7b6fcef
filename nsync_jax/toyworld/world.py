"""A procedural image world for testing style learning: coloured shapes on a plain background, in a style.

Content (which shapes, colours, background) and style (texture and stroke) vary independently, so a method
that learns a style can be checked for both: did the style come out, and did the prompt's content survive?
Eight styles are seen in pretraining; four are held out and exist only to be learned later.

Everything is a pure function of a seed (`sample_scenes`) or of a scene (`render`): numpy and Pillow only,
no global random state. Shapes are drawn 4x supersampled and box-downsampled, so edges are antialiased.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "diamond")
# Hues spread around the wheel plus two darker/lighter ones; none is near a background colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (240, 215, 20),
    "green": (30, 160, 50),
    "blue": (30, 80, 220),
    "purple": (130, 40, 180),
    "pink": (250, 120, 190),
    "brown": (120, 70, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 175),
}
SEEN_STYLES: tuple[str, ...] = ("flat", "striped", "dotted", "outlined", "checkered", "grainy", "gradient",
                                "pixelated")
# Held out: three new textures, and a new stroke (framed: `outlined`'s line, in another shade, around the flat
# fill), which recombines what the bundled model draws: NSYNC-LoRA learns it there, tokens do not (benchmarks/history/
# 2026-12-04-tenth-session.md).
HELD_OUT_STYLES: tuple[str, ...] = ("zigzag", "halftone", "crosshatch", "framed")
GENERIC_STYLE = "drawing"
ALL_STYLES: tuple[str, ...] = SEEN_STYLES + HELD_OUT_STYLES

_SUPERSAMPLE = 4
_GRAIN_CELL = 3  # px at 64
_ROTATION = 20.0  # degrees either way: enough jitter, yet a square never turns into a diamond or a cross into an x


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    background: str
    style: str
    # Per shape (cx, cy, size, rotation): centre and diameter as fractions of the image, rotation in degrees.
    layout: tuple[tuple[float, float, float, float], ...]


def sample_scenes(seed: int, count: int, styles=SEEN_STYLES, max_shapes: int = 2,
                  two_shape_share: float | None = None) -> list[Scene]:
    """`count` random scenes, a pure function of the arguments; one or two distinct shapes per scene.

    `two_shape_share`: the chance of a two-shape scene (needs `max_shapes=2`); None draws the shape count
    uniformly, as before the option existed, so a seed keeps its scenes.
    """
    styles = tuple(styles)
    unknown = [s for s in styles if s not in ALL_STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown styles {unknown} (known: {', '.join(ALL_STYLES)})")
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
    if two_shape_share is not None and (max_shapes != 2 or not 0 <= two_shape_share <= 1):
        raise ValueError(f"two_shape_share={two_shape_share} needs max_shapes=2 and a value in [0, 1]")
    rng = np.random.default_rng(seed)
    colour_names, background_names = list(COLOURS), list(BACKGROUNDS)
    scenes = []
    for _ in range(count):
        n = int(rng.integers(1, max_shapes + 1)) if two_shape_share is None else 1 + int(rng.random() < two_shape_share)
        shapes = tuple(SHAPES[i] for i in rng.choice(len(SHAPES), n, replace=False))
        colours = tuple(colour_names[i] for i in rng.integers(0, len(colour_names), n))
        background = background_names[int(rng.integers(0, len(background_names)))]
        style = styles[int(rng.integers(0, len(styles)))]
        scenes.append(Scene(shapes, colours, background, style, _sample_layout(rng, n)))
    return scenes


def _sample_layout(rng: np.random.Generator, n: int) -> tuple[tuple[float, float, float, float], ...]:
    sizes = rng.uniform(0.40, 0.60, 1) if n == 1 else rng.uniform(0.34, 0.46, n)
    while True:  # rejection sampling: two shapes may touch but not overlap much
        centres = [rng.uniform(0.55 * s + 0.03, 1 - 0.55 * s - 0.03, 2) for s in sizes]
        if n == 1 or np.linalg.norm(centres[0] - centres[1]) >= 0.95 * (sizes[0] + sizes[1]) / 2:
            break
    rotations = rng.uniform(-_ROTATION, _ROTATION, n)
    return tuple((round(float(c[0]), 4), round(float(c[1]), 4), round(float(s), 4), round(float(r), 2))
                 for c, s, r in zip(centres, sizes, rotations))


def content_caption(scene: Scene) -> str:
    """What is in the image, without the style: 'a red star and a blue circle on a white background'."""
    things = " and ".join(f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for s, c in zip(scene.shapes, scene.colours))
    return f"{things} on a {scene.background} background"


def caption(scene: Scene, style_word: str | None = None) -> str:
    """The full prompt; `style_word` replaces the style's name (a learned token, or GENERIC_STYLE)."""
    return f"{content_caption(scene)} in the style of {style_word or scene.style}"


# ------------------------------------------------------------------------------------------------------------
# Geometry: each shape is a list of closed outlines in unit coordinates (radius ~1), the holes flagged.
# ------------------------------------------------------------------------------------------------------------

def _circle(radius: float, points: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def _regular(radii, count: int, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(count) * 2 * np.pi / count
    return np.asarray(radii)[np.arange(count) % len(radii), None] * np.stack([np.cos(t), np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 128, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16.5  # y points down in images; recentre the bounding box


_W, _L = 0.32, 0.95  # cross arm half-width and length
_OUTLINES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_circle(1.0), False)],
    "square": [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), False)],
    "triangle": [(_regular([1.15], 3) + [0, 0.12], False)],
    "star": [(_regular([1.12, 0.46], 10) + [0, 0.08], False)],
    "heart": [(_heart(), False)],
    "cross": [(np.array([[-_W, -_L], [_W, -_L], [_W, -_W], [_L, -_W], [_L, _W], [_W, _W], [_W, _L], [-_W, _L],
                         [-_W, _W], [-_L, _W], [-_L, -_W], [-_W, -_W]]), False)],
    "ring": [(_circle(1.0), False), (_circle(0.5), True)],
    "diamond": [(np.array([[0, -1.1], [0.66, 0], [0, 1.1], [-0.66, 0]]), False)],
}
# The furthest outline point from a shape's centre, in radii: bounds the box a shape is painted in.
_REACH = max(float(np.linalg.norm(points, axis=1).max()) for outline in _OUTLINES.values() for points, _ in outline)


def _place(points: np.ndarray, placement, size: int) -> list[tuple[float, float]]:
    cx, cy, diameter, rotation = placement
    a = math.radians(rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    xy = points @ rot.T * (diameter * size * _SUPERSAMPLE / 2) + np.array([cx, cy]) * size * _SUPERSAMPLE
    return [tuple(p) for p in xy]


def _shape_masks(shape: str, placement, size: int, outline: bool = False) -> np.ndarray:
    """Supersampled fill mask (float32 in {0, 1}) of one placed shape, or its inner outline if `outline`."""
    big = size * _SUPERSAMPLE
    fill = Image.new("L", (big, big))
    draw = ImageDraw.Draw(fill)
    outlines = [(_place(points, placement, size), hole) for points, hole in _OUTLINES[shape]]
    for xy, hole in outlines:
        draw.polygon(xy, fill=0 if hole else 255)
    fill_mask = np.asarray(fill, np.float32) / 255
    if not outline:
        return fill_mask
    line = Image.new("L", (big, big))
    draw = ImageDraw.Draw(line)
    # ~3 px at 64, thinner on small shapes so a ring or cross arm keeps a visible gap inside its outline.
    stroke = min(3.0 * size / 64, 0.16 * placement[2] * size / 2)
    width = max(1, round(2 * stroke * _SUPERSAMPLE))  # the line is centred on the edge; the inner half is kept
    for xy, _ in outlines:
        # Round joints fill the corners; smooth outlines (many points) need none, and they are slow to draw.
        draw.line(xy + xy[:1], fill=255, width=width, joint="curve" if len(xy) <= 12 else None)
    return fill_mask * (np.asarray(line, np.float32) / 255)


def coverage(scene: Scene, size: int = 64) -> np.ndarray:
    """How much of each pixel each shape fills: float32 (num_shapes, size, size) in [0, 1]."""
    return np.stack([_downsample(_shape_masks(shape, placement, size))
                     for shape, placement in zip(scene.shapes, scene.layout)])


def mask(scene: Scene, size: int = 64) -> np.ndarray:
    """Where the shapes are: bool (size, size), the union of the shapes' filled areas."""
    return coverage(scene, size).max(0) >= 0.5


# ------------------------------------------------------------------------------------------------------------
# Styles: a texture per shape, in supersampled pixel coordinates measured in final pixels at 64 px.
# ------------------------------------------------------------------------------------------------------------

def _texture(style: str, colour: np.ndarray, placement, x: np.ndarray, y: np.ndarray):
    """The shape's paint as `(t, low, high)`: per pixel `low + t * (high - low)`, `t` of shape (h, w) or 1.

    `x`, `y` are offsets from the shape's centre in pixels of a 64-px image, so patterns scale with the size.
    Two-tone styles mix the colour with a light tint of itself, which keeps the colour dominant.
    """
    tint = colour + 0.5 * (255 - colour)
    diameter = placement[2] * 64
    a = math.radians(placement[3])
    along = np.clip((x * math.cos(a) + y * math.sin(a)) / diameter + 0.5, 0, 1)  # 0 -> 1 across the shape
    if style in ("flat", "outlined", "grainy", "pixelated", "framed"):
        return 1.0, colour, colour
    if style == "gradient":
        return along, 0.6 * colour, colour + 0.5 * (255 - colour)
    if style == "striped":
        on = np.mod(y, 6.0) < 3.0
    elif style == "dotted":
        on = np.hypot(np.mod(x, 6.0) - 3.0, np.mod(y, 6.0) - 3.0) < 2.2
    elif style == "checkered":
        on = (np.floor(x / 6.0) + np.floor(y / 6.0)) % 2 == 0
    # The held-out styles are 2.5x coarser than they were first drawn: the bundled model's VAE (8x downsampling) keeps
    # about as much of them through a round trip as of `striped` (texture correlation 0.76-0.81 against 0.82;
    # 0.40-0.62 at the first periods; benchmarks/history/2026-12-03.md), so a method can learn them in principle.
    # Never pretrained on, they can be redefined with only a new judge. Their diagonal periods (11-12.5 px) also stay
    # clear of the 8.5 px diagonal fundamental of `checkered`, all that a blur leaves of its squares.
    elif style == "zigzag":
        wave = np.abs(np.mod(x, 20.0) - 10.0) - 5.0  # triangle wave in [-5, 5]: chevrons of slope 1.5
        on = np.mod(y + 1.5 * wave, 17.5) < 8.75  # 8.75 px bands, their arms 56 degrees off the stripes
    elif style == "halftone":
        u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)  # a 45 degree grid, as in print
        radius = 8.5 - 6.5 * along  # dots merge on one side and shrink to specks on the other
        on = np.hypot(np.mod(u, 12.5) - 6.25, np.mod(v, 12.5) - 6.25) < radius
    elif style == "crosshatch":
        u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)  # 3.5 px lines every 11.25 px, both diagonals
        on = (np.abs(np.mod(u, 11.25) - 5.625) < 1.75) | (np.abs(np.mod(v, 11.25) - 5.625) < 1.75)
    else:
        raise ValueError(f"unknown style {style!r}")
    return on.astype(np.float32), tint, colour


def _downsample(image: np.ndarray, factor: int = _SUPERSAMPLE) -> np.ndarray:
    """Box filter of the last two axes by `factor`, one axis at a time (faster than one 2-axis mean)."""
    *lead, h, w = image.shape
    rows = image.reshape(*lead, h // factor, factor, w).sum(-2)
    return rows.reshape(*lead, h // factor, w // factor, factor).sum(-1) / factor**2


def _block_average(image: np.ndarray, block: int) -> np.ndarray:
    *_, h, w = image.shape
    padded = np.pad(image, ((0, 0), (0, -h % block), (0, -w % block)), mode="edge")
    blocks = _downsample(padded, block)
    return np.repeat(np.repeat(blocks, block, -2), block, -1)[:, :h, :w]


def _scene_rng(scene: Scene, size: int) -> np.random.Generator:
    """Randomness (grain) from the scene's content, so a scene always renders the same bytes."""
    digest = hashlib.sha256(f"{scene!r}|{size}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as uint8 (size, size, 3); a pure function of `scene` and `size`."""
    if scene.style not in ALL_STYLES:
        raise ValueError(f"unknown style {scene.style!r}")
    big = size * _SUPERSAMPLE
    image = np.empty((3, big, big), np.float32)  # channels first: every per-channel operation is contiguous
    for c, value in enumerate(BACKGROUNDS[scene.background]):
        image[c] = value
    coords = (np.arange(big, dtype=np.float32) + 0.5) / _SUPERSAMPLE * (64 / size)
    covered = np.zeros((big, big), np.float32)  # for grain
    for shape, colour_name, placement in zip(scene.shapes, scene.colours, scene.layout):
        alpha = _shape_masks(shape, placement, size, outline=scene.style == "outlined")
        if scene.style == "grainy":
            covered = np.maximum(covered, alpha)
        reach = _REACH * placement[2] * big / 2 + _SUPERSAMPLE  # paint only the shape's bounding box
        lo = [max(0, int(placement[i] * big - reach)) for i in (1, 0)]
        hi = [min(big, int(math.ceil(placement[i] * big + reach))) for i in (1, 0)]
        box = np.s_[lo[0]:hi[0], lo[1]:hi[1]]
        x, y = np.meshgrid(coords[box[1]] - placement[0] * 64, coords[box[0]] - placement[1] * 64)
        t, low, high = _texture(scene.style, np.asarray(COLOURS[colour_name], np.float32), placement, x, y)
        a = alpha[box]
        for c in range(3):
            paint = low[c] + t * (high[c] - low[c])
            image[c][box] += a * (paint - image[c][box])
        if scene.style == "framed":  # `outlined`'s line over the fill: a dark shade of the colour, or a light one
            line = _shape_masks(shape, placement, size, outline=True)[box]  # on black, where dark would vanish
            ink = low + 0.5 * (255 - low) if scene.background == "black" else 0.35 * low
            for c in range(3):
                image[c][box] += line * (ink[c] - image[c][box])
    image = _downsample(image)
    if scene.style == "grainy":
        # Grain in square cells of 3 px at 64: per-pixel grain does not pass a VAE with 4x-smaller latents (texture
        # kept 0.32 through the fourth model's VAE; 3-px cells 0.69: benchmarks/history/2026-12-04-ninth-session.md).
        cell = max(1, round(_GRAIN_CELL * size / 64))
        cells = _scene_rng(scene, size).normal(0.0, 1.0, (-(-size // cell),) * 2).astype(np.float32)
        grain = np.repeat(np.repeat(cells, cell, 0), cell, 1)[:size, :size]
        image += grain * (15 + 30 * _downsample(covered))  # strong on shapes, mild on the background
    elif scene.style == "pixelated":
        image = _block_average(image, max(1, round(size / 16)))
    return np.clip(np.round(image), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


def render_batch(scenes, size: int = 64) -> np.ndarray:
    """(N, size, size, 3) uint8."""
    return np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
