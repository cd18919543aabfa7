"""The embedded default data set: procedurally drawn captioned scenes.

Record ``id`` is drawn from ``np.random.Generator(np.random.PCG64([seed, id]))`` alone, so it
does not depend on ``n``, on other records or on the order of generation.

A scene is one or two objects (named colour, shape, coarse size) on a named background
colour. The caption names only part of the content, e.g. "a small red circle left of a blue
square on a gray background" or "an orange ring at the top left on a beige background"; the
image adds per-sample detail the caption does not fix: exact positions and radii, a small
rotation, colour shades (jitter around the named colour plus a linear shading across each
object), and a background texture (gradient, stripes, blobs or smooth noise with random
orientation, frequency and phase). A model that memorised a member can reproduce that
detail; for a non-member it can only guess it from the caption.

Bit-reproducibility across machines: only PCG64 integer draws and ``random()`` doubles (both
exactly specified) are used; rendering uses IEEE float +, -, *, /, comparisons and floor (no
transcendental functions, whose results differ between libms) and no float reductions
(summation order may differ); objects are anti-aliased by 4x4 supersampling with integer
coverage counts and integer compositing. Geometry is in image-relative units, so a larger
``size`` renders the same scene at a higher resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import math

import numpy as np

from t2i_mia.data.records import MAX_ID, Record
from t2i_mia.errors import DataError

GENERATOR_VERSION = 1
SUPERSAMPLE = 4  # sub-samples per pixel side; coverage counts go 0..16

OBJECT_COLOURS = (
    ("red", (205, 35, 35)), ("orange", (240, 135, 25)), ("yellow", (235, 215, 35)),
    ("green", (45, 165, 55)), ("cyan", (45, 205, 215)), ("blue", (35, 65, 205)),
    ("purple", (135, 45, 175)), ("pink", (240, 125, 185)),
)
BACKGROUNDS = (
    ("black", (35, 35, 35)), ("gray", (128, 128, 128)), ("white", (222, 222, 222)),
    ("beige", (212, 194, 158)), ("navy", (28, 36, 92)),
)
SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond")
# (caption word, radius range as a fraction of the image side); medium has no word.
SIZE_CLASSES = (("small", 0.09, 0.13), ("", 0.14, 0.19), ("large", 0.20, 0.26))
LOCATIONS = (("at the top left", "at the top", "at the top right"),
             ("on the left", "in the center", "on the right"),
             ("at the bottom left", "at the bottom", "at the bottom right"))
TEXTURES = ("gradient", "stripes", "blobs", "noise")
P_ONE_OBJECT = 0.2
MAX_ROTATION_T = 0.105  # tan(angle/2): about +-12 degrees, so a square never looks a diamond


@dataclass(frozen=True)
class _Object:
    colour: int
    shape: int
    size_class: int
    cx: float
    cy: float
    r: float
    rot: tuple[float, float]  # (cos, sin) of the rotation, from a rational parametrisation
    rgb: tuple[int, int, int]  # named colour + per-sample jitter
    shade: tuple[float, float, float]  # (a, b, amplitude) of a linear shading across it


@dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object, ...]
    relation: str  # "" for one object
    location: tuple[int, int] | None  # (row, col) of a single object's cell
    background: int
    bg_rgb: tuple[float, float, float]
    texture: int
    texture_params: tuple


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(rng.random())


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi): floor of a uniform double (exact; faster than rng.integers)."""
    return lo + int(float(rng.random()) * (hi - lo))


def _rotation(t: float) -> tuple[float, float]:
    """(cos, sin) of the angle 2*atan(t), by the rational parametrisation (no trig)."""
    d = 1.0 + t * t
    return (1.0 - t * t) / d, 2.0 * t / d


def _sample_object(rng: np.random.Generator) -> _Object:
    colour = _randint(rng, 0, len(OBJECT_COLOURS))
    shape = _randint(rng, 0, len(SHAPES))
    size_class = _randint(rng, 0, len(SIZE_CLASSES))
    _, lo, hi = SIZE_CLASSES[size_class]
    r = _uniform(rng, lo, hi)
    rot = _rotation(_uniform(rng, -MAX_ROTATION_T, MAX_ROTATION_T))
    base = OBJECT_COLOURS[colour][1]
    rgb = tuple(min(255, max(0, base[c] + _randint(rng, -22, 23))) for c in range(3))
    shade = (_uniform(rng, -1.0, 1.0), _uniform(rng, -1.0, 1.0), _uniform(rng, 6.0, 20.0))
    return _Object(colour, shape, size_class, 0.5, 0.5, r, rot, rgb, shade)


def _place(obj: _Object, cx: float, cy: float, r: float | None = None) -> _Object:
    return _Object(obj.colour, obj.shape, obj.size_class, cx, cy,
                   obj.r if r is None else r, obj.rot, obj.rgb, obj.shade)


def _sample_scene(seed: int, id: int) -> _Scene:
    rng = np.random.Generator(np.random.PCG64([seed, id]))
    n_obj = 1 if rng.random() < P_ONE_OBJECT else 2
    objs = [_sample_object(rng) for _ in range(n_obj)]
    relation, location = "", None
    if n_obj == 1:
        row, col = _randint(rng, 0, 3), _randint(rng, 0, 3)
        o = objs[0]
        m = 0.9 * o.r  # the object stays (almost) inside the image
        cx = min(1.0 - m, max(m, _uniform(rng, (col + 0.2) / 3.0, (col + 0.8) / 3.0)))
        cy = min(1.0 - m, max(m, _uniform(rng, (row + 0.2) / 3.0, (row + 0.8) / 3.0)))
        objs = [_place(o, cx, cy)]
        location = (row, col)
    else:
        a, b = objs
        for _ in range(200):
            ax = _uniform(rng, 0.9 * a.r, 1.0 - 0.9 * a.r)
            ay = _uniform(rng, 0.9 * a.r, 1.0 - 0.9 * a.r)
            bx = _uniform(rng, 0.9 * b.r, 1.0 - 0.9 * b.r)
            by = _uniform(rng, 0.9 * b.r, 1.0 - 0.9 * b.r)
            dx, dy = abs(ax - bx), abs(ay - by)
            big, small = max(dx, dy), min(dx, dy)
            # Apart (Chebyshev distance, no sqrt) and one axis clearly dominant, so the
            # relation word is unambiguous.
            if big >= 0.85 * (a.r + b.r) and big >= 1.3 * small:
                break
        else:  # practically never (two large objects, 200 misses): a fixed fallback layout
            ax, ay, bx, by = 0.27, 0.5, 0.73, 0.5
            a, b = _place(a, ax, ay, min(a.r, 0.2)), _place(b, bx, by, min(b.r, 0.2))
        objs = [_place(a, ax, ay, a.r), _place(b, bx, by, b.r)]
        dx, dy = ax - bx, ay - by
        if abs(dx) >= abs(dy):
            relation = "left of" if dx < 0 else "right of"
        else:
            relation = "above" if dy < 0 else "below"  # y grows downwards
    background = _randint(rng, 0, len(BACKGROUNDS))
    base = BACKGROUNDS[background][1]
    bg_rgb = tuple(float(base[c] + _randint(rng, -12, 13)) for c in range(3))
    texture = _randint(rng, 0, len(TEXTURES))
    amp = _uniform(rng, 18.0, 40.0)
    if TEXTURES[texture] == "gradient":
        params = (amp, _uniform(rng, -1.0, 1.0), _uniform(rng, -1.0, 1.0))
    elif TEXTURES[texture] == "stripes":
        params = (amp, _rotation(_uniform(rng, -1.0, 1.0)), _uniform(rng, 1.5, 4.5),
                  float(rng.random()))
    elif TEXTURES[texture] == "blobs":
        k = _randint(rng, 2, 6)
        params = (amp, tuple((float(rng.random()), float(rng.random()),
                              _uniform(rng, 0.15, 0.4)) for _ in range(k)))
    else:  # noise: a random 4x4 grid, bilinearly interpolated
        params = (amp, rng.random((4, 4)))
    return _Scene(tuple(objs), relation, location, background, bg_rgb, texture, params)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(o: _Object) -> str:
    words = [w for w in (SIZE_CLASSES[o.size_class][0], OBJECT_COLOURS[o.colour][0],
                         SHAPES[o.shape]) if w]
    return f"{_article(words[0])} {' '.join(words)}"


def _caption(scene: _Scene) -> str:
    bg = f"on {_article(BACKGROUNDS[scene.background][0])} {BACKGROUNDS[scene.background][0]} " \
         f"background"
    if scene.location is not None:
        row, col = scene.location
        return f"{_phrase(scene.objects[0])} {LOCATIONS[row][col]} {bg}"
    a, b = scene.objects
    return f"{_phrase(a)} {scene.relation} {_phrase(b)} {bg}"


def _texture(scene: _Scene, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """f64[S, S] in [0, 1] at pixel centres; x is f64[1, S], y f64[S, 1]."""
    kind = TEXTURES[scene.texture]
    p = scene.texture_params
    if kind == "gradient":
        _, a, b = p
        return 0.5 + 0.5 * (a * (x - 0.5) + b * (y - 0.5))
    if kind == "stripes":
        _, (c, s), freq, phase = p
        q = (c * x + s * y) * freq + phase
        return np.abs(2.0 * (q - np.floor(q)) - 1.0)  # triangle wave
    if kind == "blobs":
        t = np.zeros(np.broadcast_shapes(x.shape, y.shape))
        for bx, by, rb in p[1]:
            d2 = ((x - bx) * (x - bx) + (y - by) * (y - by)) / (rb * rb)
            t = np.maximum(t, 1.0 - d2)
        return t
    grid = p[1]
    gx, gy = x * 3.0, y * 3.0
    ix = np.minimum(np.floor(gx), 2.0).astype(np.intp)
    iy = np.minimum(np.floor(gy), 2.0).astype(np.intp)
    fx, fy = gx - ix, gy - iy
    top = grid[iy, ix] * (1.0 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1.0 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1.0 - fy) + bottom * fy


def _shape_mask(o: _Object, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """bool[h, w]: sub-samples inside the shape; dx f64[1, w], dy f64[h, 1] from the centre."""
    r = o.r
    shape = SHAPES[o.shape]
    if shape in ("circle", "ring"):
        d2 = dx * dx + dy * dy
        inside = d2 <= r * r
        if shape == "ring":
            inside &= d2 >= (0.55 * r) * (0.55 * r)
        return inside
    c, s = o.rot
    u = c * dx + s * dy
    v = c * dy - s * dx
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        h = 0.82 * r
        return (au <= h) & (av <= h)
    if shape == "diamond":
        return au + av <= r
    if shape == "cross":
        w = 0.3 * r
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    # triangle, apex up: v from -r (apex) to 0.8 r (base), half-width r at the base
    return (v >= -r) & (v <= 0.8 * r) & (au * 1.8 <= v + r)


def _quantise(v: np.ndarray) -> np.ndarray:
    """Round half up to int32 in [0, 255]."""
    return np.minimum(np.maximum(np.floor(v + 0.5), 0.0), 255.0).astype(np.int32)


def _grids(size: int) -> tuple[np.ndarray, np.ndarray]:
    """f64[size] pixel centres and f64[size * SUPERSAMPLE] sub-sample centres in [0, 1)."""
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size
    sub = (np.arange(size * SUPERSAMPLE, dtype=np.float64) + 0.5) / (size * SUPERSAMPLE)
    return centres, sub


def _render(scene: _Scene, size: int, grids: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint8[size, size, 3] of a scene; ``grids`` = ``_grids(size)``."""
    centres, sub = grids
    x, y = centres[None, :], centres[:, None]
    t = _texture(scene, x, y)
    t = np.minimum(np.maximum(t, 0.0), 1.0)
    amp = scene.texture_params[0]
    shade = amp * (2.0 * t - 1.0)
    img = _quantise(np.asarray(scene.bg_rgb)[None, None, :] + shade[:, :, None])  # int32
    ss = SUPERSAMPLE
    n_sub = ss * ss
    for o in scene.objects:
        bound = 1.3 * o.r  # every shape lies within this distance of its centre
        x0 = max(0, math.floor((o.cx - bound) * size))
        x1 = min(size, math.floor((o.cx + bound) * size) + 1)
        y0 = max(0, math.floor((o.cy - bound) * size))
        y1 = min(size, math.floor((o.cy + bound) * size) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        h, w = y1 - y0, x1 - x0
        mask = _shape_mask(o, (sub[x0 * ss:x1 * ss] - o.cx)[None, :],
                           (sub[y0 * ss:y1 * ss] - o.cy)[:, None])
        # Sub-samples inside, per pixel: 0..16, exact integer counts.
        cov = mask.reshape(h, ss, w * ss).sum(axis=1, dtype=np.int32).reshape(h, w, ss).sum(
            axis=2)
        # Linear shading across the object, evaluated at pixel centres.
        a, b, s_amp = o.shade
        px = centres[x0:x1] - o.cx
        py = centres[y0:y1] - o.cy
        lin = np.minimum(np.maximum((a * px[None, :] + b * py[:, None]) / o.r, -1.0), 1.0)
        col = _quantise(np.asarray(o.rgb, np.float64)[None, None, :]
                        + (s_amp * lin)[:, :, None])
        region = img[y0:y1, x0:x1]
        c3 = cov[:, :, None]
        img[y0:y1, x0:x1] = (region * (n_sub - c3) + col * c3 + n_sub // 2) // n_sub
    return img.astype(np.uint8)


class SyntheticCaptions:
    """The embedded default Dataset: ids 0..n-1, images uint8[size, size, 3].

    ``SyntheticCaptions(seed, size=32, n=10000)``. Record ``i`` depends on (seed, i) alone;
    ``size`` only changes the resolution of the same scene.
    """

    def __init__(self, seed: int, size: int = 32, n: int = 10000):
        for key, value, lo in (("seed", seed, 0), ("size", size, 4), ("n", n, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < lo:
                raise DataError(f"SyntheticCaptions: {key} must be an integer >= {lo}, "
                                f"got {value!r}")
        if n > MAX_ID + 1:
            raise DataError(f"SyntheticCaptions: n must be <= 2**32, got {n}")
        self.seed, self.image_size, self.n = int(seed), int(size), int(n)
        self._grids = _grids(self.image_size)
        self.name = f"synthetic-v{GENERATOR_VERSION}(seed={self.seed},n={self.n}," \
                    f"size={self.image_size})"

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return self.name

    def ids(self) -> list[int]:
        return list(range(self.n))

    def _check(self, id: int) -> int:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) \
                or not 0 <= id < self.n:
            raise DataError(f"{self.name}: no record with id {id!r} (ids are 0..{self.n - 1})")
        return int(id)

    def caption(self, id: int) -> str:
        """The caption of record ``id`` (cheap: nothing is rendered)."""
        return _caption(_sample_scene(self.seed, self._check(id)))

    def captions(self, ids: Sequence[int]) -> list[str]:
        return [self.caption(i) for i in ids]

    def image(self, id: int) -> np.ndarray:
        """uint8[size, size, 3] of record ``id``."""
        return _render(_sample_scene(self.seed, self._check(id)), self.image_size, self._grids)

    def get(self, id: int) -> Record:
        scene = _sample_scene(self.seed, self._check(id))
        image = _render(scene, self.image_size, self._grids)
        image.flags.writeable = False  # fresh array: the Record can keep it without a copy
        return Record(int(id), image, _caption(scene))

    def records(self, ids: Sequence[int]) -> list[Record]:
        return [self.get(i) for i in ids]

    def get_many(self, ids: Sequence[int]) -> tuple[np.ndarray, list[str]]:
        out = np.empty((len(ids), self.image_size, self.image_size, 3), np.uint8)
        caps = []
        for k, i in enumerate(ids):
            scene = _sample_scene(self.seed, self._check(i))
            out[k] = _render(scene, self.image_size, self._grids)
            caps.append(_caption(scene))
        return out, caps
