"""The embedded demo data set: the same shapes drawn in four visual styles.

:func:`ensure_synthetic_dataset` draws, once, a small image folder laid out
like PACS (``<root>/<domain>/<class>/<i>.png``) in a user cache folder, so the
trainer can be demonstrated and tested with no download. The four domains are
four clearly different renderings of the same five shape classes:

- ``photo``: a shaded, gradient-filled shape with a soft shadow on a blurry,
  textured, natural-looking background;
- ``cartoon``: a flat saturated fill with a thick black outline on a plain
  pastel background;
- ``sketch``: a thin, slightly jittered dark outline on white paper;
- ``painting``: brush strokes of noisy colour, inside the shape and out.

Position, size, rotation and colours vary per image (seeded per
domain/class/index with :func:`~fedclip_lightning.data.partition.stable_seed`),
so the task is not trivial, yet the whole set takes well under a second or two.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import DataError
from .partition import stable_seed

SYNTHETIC_DOMAINS: list[str] = ["photo", "cartoon", "sketch", "painting", "chalk", "neon"]
SYNTHETIC_CLASSES: list[str] = ["circle", "square", "triangle", "star", "cross"]
VERSION = "synthetic-v1"
_COMPLETE = ".complete"
_SUPERSAMPLE = 2

Point = tuple[float, float]


def default_cache_dir() -> Path:
    """Where generated data is cached.

    ``$FEDCLIP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fedclip-lightning``,
    else ``~/.cache/fedclip-lightning``.
    """
    explicit = os.environ.get("FEDCLIP_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "fedclip-lightning"
    return Path.home() / ".cache" / "fedclip-lightning"


def _params(per_class: int, image_size: int, seed: int) -> dict[str, object]:
    return {
        "version": VERSION,
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
        "domains": SYNTHETIC_DOMAINS,
        "classes": SYNTHETIC_CLASSES,
    }


def synthetic_dataset_dir(
    cache_dir: Path | None = None, *, per_class: int = 24, image_size: int = 64, seed: int = 0
) -> Path:
    """The folder :func:`ensure_synthetic_dataset` uses for these parameters (it may not exist yet)."""
    params = _params(per_class, image_size, seed)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:10]
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{VERSION}-{digest}"


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file()


# --------------------------------------------------------------------------- geometry


def _shape_polygon(cls: str, cx: float, cy: float, r: float, theta: float, aspect: float = 1.0) -> list[Point]:
    """Vertices of a class's shape centred at (cx, cy) with outer radius r, rotated by theta."""
    if cls == "circle":
        pts = [(math.cos(2 * math.pi * k / 64), aspect * math.sin(2 * math.pi * k / 64)) for k in range(64)]
    elif cls == "square":
        s = 1 / math.sqrt(2)
        pts = [(s, s), (-s, s), (-s, -s), (s, -s)]
    elif cls == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif cls == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif cls == "cross":
        w, e = 0.3, 0.95
        pts = [(w, w), (w, e), (-w, e), (-w, w), (-e, w), (-e, -w), (-w, -w), (-w, -e), (w, -e), (w, -w),
               (e, -w), (e, w)]
    else:  # pragma: no cover - classes are a fixed list
        raise ValueError(f"unknown synthetic class {cls!r}")
    c, s_ = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c - y * s_), cy + r * (x * s_ + y * c)) for x, y in pts]


def _densify(poly: list[Point], step: float) -> list[Point]:
    """The closed polygon with extra points every ``step`` pixels along its edges."""
    out: list[Point] = []
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        out.extend((x0 + (x1 - x0) * t / n, y0 + (y1 - y0) * t / n) for t in range(n))
    return out


def _mask(size: int, poly: list[Point]) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    ImageDraw.Draw(m).polygon(poly, fill=255)
    return m


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid if channels == 3 else grid[..., 0]).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr if channels == 3 else arr[..., None]


# --------------------------------------------------------------------------- styles


def _draw_photo(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float]) -> Image.Image:
    cx, cy, r, theta = geo
    # Natural-ish background: sky/grass/earth palette, blurry blobs plus grain.
    palette = np.array(
        [[_hsv(rng.uniform(0.05, 0.38), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.85))
          for _ in range(2)]], dtype=np.float32
    )[0] / 255.0
    t = _smooth_noise(rng, size, int(rng.integers(3, 7)), 1)
    bg = palette[0] * (1 - t) + palette[1] * t
    bg = bg * (0.85 + 0.3 * _smooth_noise(rng, size, int(rng.integers(10, 20)), 1))
    bg += rng.normal(0, 0.035, (size, size, 3)).astype(np.float32)
    poly = _shape_polygon(cls, cx, cy, r, theta, aspect=rng.uniform(0.8, 1.0))
    # Soft drop shadow.
    off = r * 0.12
    shadow = np.asarray(
        _mask(size, [(x + off, y + off) for x, y in poly]).filter(ImageFilter.GaussianBlur(r * 0.12)),
        dtype=np.float32,
    )[..., None] / 255.0
    img = bg * (1 - 0.45 * shadow)
    # Shape with a directional gradient (lit side to shaded side) and a highlight.
    hue = rng.random()
    light = np.array(_hsv(hue, rng.uniform(0.45, 0.8), 1.0), dtype=np.float32) / 255.0
    dark = np.array(_hsv(hue + rng.uniform(-0.04, 0.04), rng.uniform(0.7, 1.0), rng.uniform(0.2, 0.45)),
                    dtype=np.float32) / 255.0
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    g = ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / (2 * r) + 0.5
    g = np.clip(g, 0, 1)[..., None]
    fill = light * (1 - g) + dark * g
    hx, hy = cx - 0.35 * r * math.cos(a), cy - 0.35 * r * math.sin(a)
    spec = np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.3 * r) ** 2)))[..., None]
    fill = fill + 0.35 * spec
    fill += rng.normal(0, 0.02, (size, size, 3)).astype(np.float32)
    m = np.asarray(_mask(size, poly).filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)[..., None] / 255.0
    img = img * (1 - m) + fill * m
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def _draw_cartoon(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float]) -> Image.Image:
    cx, cy, r, theta = geo
    bg = _hsv(rng.random(), rng.uniform(0.12, 0.3), rng.uniform(0.93, 1.0))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    poly = _shape_polygon(cls, cx, cy, r, theta)
    fill = _hsv(rng.random(), rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0))
    width = max(2, int(round(size * rng.uniform(0.035, 0.055))))
    d.polygon(poly, fill=fill)
    d.line(poly + poly[:1], fill=(0, 0, 0), width=width, joint="curve")
    for x, y in poly if cls != "circle" else []:
        d.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=(0, 0, 0))
    return img


def _draw_sketch(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float]) -> Image.Image:
    cx, cy, r, theta = geo
    paper = int(rng.integers(238, 256))
    img = Image.new("RGB", (size, size), (paper, paper, paper - int(rng.integers(0, 8))))
    d = ImageDraw.Draw(img)
    ink = int(rng.integers(20, 90))
    width = max(2, int(round(size / 64)))
    strokes = int(rng.integers(1, 3))
    for _ in range(strokes):
        poly = _shape_polygon(cls, cx + rng.normal(0, size * 0.004), cy + rng.normal(0, size * 0.004),
                              r * rng.uniform(0.97, 1.03), theta + rng.normal(0, 0.03))
        pts = _densify(poly, size / 40)
        jitter = rng.normal(0, size * 0.006, (len(pts), 2))
        path = [(x + jx, y + jy) for (x, y), (jx, jy) in zip(pts, jitter)]
        # Sketchy: the stroke may overshoot its start a little and skip a tiny gap.
        gap = int(rng.integers(0, max(1, len(path) // 12)))
        path = path[gap:] + path[: max(1, len(path) // 10)]
        d.line(path, fill=(ink, ink, ink), width=width)
    # A few hatching lines inside the shape, as sketchers do.
    m = _mask(size, _shape_polygon(cls, cx, cy, r * 0.9, theta))
    hatch = Image.new("L", (size, size), 0)
    hd = ImageDraw.Draw(hatch)
    a = rng.uniform(0, math.pi)
    step = size * rng.uniform(0.05, 0.09)
    for k in range(-int(size / step) - 2, int(size / step) + 3):
        ox, oy = cx + k * step * math.cos(a + math.pi / 2), cy + k * step * math.sin(a + math.pi / 2)
        hd.line([(ox - size * math.cos(a), oy - size * math.sin(a)), (ox + size * math.cos(a), oy + size * math.sin(a))],
                fill=int(rng.integers(60, 140)), width=max(1, width // 2))
    hatch_arr = np.asarray(hatch, dtype=np.float32) * (np.asarray(m, dtype=np.float32) / 255.0) / 255.0
    if rng.random() < 0.5:
        hatch_arr *= 0.0  # half the sketches have no hatching
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * (1 - 0.5 * hatch_arr[..., None]) + ink * 0.5 * hatch_arr[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _strokes(rng: np.random.Generator, size: int, n: int, hue: float, hue_spread: float, s: tuple[float, float],
             v: tuple[float, float], length: tuple[float, float], width: tuple[float, float],
             base: Image.Image) -> None:
    """Paint ``n`` short, thick, roughly parallel brush strokes onto ``base``."""
    d = ImageDraw.Draw(base)
    main_angle = rng.uniform(0, math.pi)
    for _ in range(n):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        a = main_angle + rng.normal(0, 0.5)
        ln = rng.uniform(*length) * size
        col = _hsv(hue + rng.normal(0, hue_spread), rng.uniform(*s), rng.uniform(*v))
        d.line([(x, y), (x + ln * math.cos(a), y + ln * math.sin(a))], fill=col,
               width=max(1, int(rng.uniform(*width) * size)))


def _draw_painting(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float]) -> Image.Image:
    cx, cy, r, theta = geo
    bg_hue = rng.random()
    canvas = Image.new("RGB", (size, size), _hsv(bg_hue, 0.35, 0.7))
    _strokes(rng, size, 140, bg_hue, 0.06, (0.2, 0.55), (0.45, 0.9), (0.08, 0.25), (0.03, 0.07), canvas)
    fg_hue = bg_hue + rng.uniform(0.25, 0.75)
    layer = Image.new("RGB", (size, size), _hsv(fg_hue, 0.75, 0.8))
    _strokes(rng, size, 160, fg_hue, 0.05, (0.55, 1.0), (0.55, 1.0), (0.06, 0.2), (0.025, 0.06), layer)
    poly = _shape_polygon(cls, cx, cy, r, theta)
    # A ragged, painterly edge: the mask is blurred and thresholded against noise.
    soft = np.asarray(_mask(size, poly).filter(ImageFilter.GaussianBlur(size * 0.02)), dtype=np.float32) / 255.0
    ragged = soft > (0.3 + 0.4 * _smooth_noise(rng, size, int(rng.integers(12, 24)), 1)[..., 0])
    m = ragged.astype(np.float32)[..., None]
    arr = np.asarray(canvas, dtype=np.float32) * (1 - m) + np.asarray(layer, dtype=np.float32) * m
    # Colour noise: per-pixel grain plus a blotchy low-frequency tint.
    arr += rng.normal(0, 12, arr.shape).astype(np.float32)
    arr *= 0.85 + 0.3 * _smooth_noise(rng, size, int(rng.integers(4, 9)), 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _outline(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float],
             jitter: float) -> list[Point]:
    """The shape's outline as a hand-drawn path: a little off the true outline, jittered, overshooting."""
    cx, cy, r, theta = geo
    poly = _shape_polygon(cls, cx + rng.normal(0, size * 0.004), cy + rng.normal(0, size * 0.004),
                          r * rng.uniform(0.97, 1.03), theta + rng.normal(0, 0.03))
    pts = _densify(poly, size / 40)
    moved = rng.normal(0, size * jitter, (len(pts), 2))
    path = [(x + jx, y + jy) for (x, y), (jx, jy) in zip(pts, moved)]
    return path + path[: max(1, len(path) // 10)]


def _draw_chalk(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float]) -> Image.Image:
    """Chalk on a blackboard: light, grainy, broken strokes on a dark slate or green board with smudges."""
    board = _hsv(rng.choice([0.33, 0.45, 0.6]) + rng.normal(0, 0.03), rng.uniform(0.1, 0.45), rng.uniform(0.12, 0.3))
    arr = np.full((size, size, 3), board, dtype=np.float32)
    arr *= 0.8 + 0.4 * _smooth_noise(rng, size, int(rng.integers(5, 10)), 1)
    layer = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(layer)
    width = max(2, int(round(size * rng.uniform(0.025, 0.04))))
    for _ in range(int(rng.integers(1, 3))):
        d.line(_outline(rng, cls, size, geo, 0.008), fill=255, width=width)
    grain = rng.random((size, size)) < rng.uniform(0.55, 0.8)  # chalk skips over the board's grain
    m = (np.asarray(layer, dtype=np.float32) / 255.0 * grain)[..., None]
    chalk = np.array(_hsv(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0)), dtype=np.float32)
    arr = arr * (1 - 0.9 * m) + chalk * 0.9 * m
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_neon(rng: np.random.Generator, cls: str, size: int, geo: tuple[float, float, float, float]) -> Image.Image:
    """A neon sign: a bright, saturated tube along the outline with a soft glow, on a near-black wall."""
    wall = rng.uniform(5, 30)
    arr = np.full((size, size, 3), wall, dtype=np.float32)
    arr += rng.normal(0, 3, arr.shape).astype(np.float32)
    tube = Image.new("L", (size, size), 0)
    ImageDraw.Draw(tube).line(_outline(rng, cls, size, geo, 0.002), fill=255,
                              width=max(2, int(round(size * rng.uniform(0.02, 0.035)))))
    core = np.asarray(tube, dtype=np.float32)[..., None] / 255.0
    glow = np.asarray(tube.filter(ImageFilter.GaussianBlur(size * rng.uniform(0.03, 0.06))),
                      dtype=np.float32)[..., None] / 255.0
    colour = np.array(_hsv(rng.random(), rng.uniform(0.7, 1.0), 1.0), dtype=np.float32)
    arr = arr + colour * np.clip(2.5 * glow, 0, 1) * 0.8
    arr = arr * (1 - core) + (0.6 * colour + 0.4 * 255) * core
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


_STYLES = {
    "photo": _draw_photo,
    "cartoon": _draw_cartoon,
    "sketch": _draw_sketch,
    "painting": _draw_painting,
    "chalk": _draw_chalk,
    "neon": _draw_neon,
}


def render_image(domain: str, cls: str, index: int, *, image_size: int = 64, seed: int = 0) -> Image.Image:
    """Draw one synthetic RGB image of class ``cls`` in the style of ``domain``.

    Deterministic in (seed, domain, cls, index). It is drawn at twice the size
    and downsampled, for smooth edges.
    """
    rng = np.random.default_rng(stable_seed(seed, domain, cls, index))
    size = image_size * _SUPERSAMPLE
    r = size * rng.uniform(0.17, 0.32)
    margin = r * 1.05
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    theta = rng.uniform(0, 2 * math.pi)
    img = _STYLES[domain](rng, cls, size, (cx, cy, r, theta))
    return img.convert("RGB").resize((image_size, image_size), Image.LANCZOS)


def _generate_domain(folder: Path, domain: str, per_class: int, image_size: int, seed: int) -> None:
    for cls in SYNTHETIC_CLASSES:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            # compress_level=1: the same pixels as any level (PNG is lossless), written several times faster.
            render_image(domain, cls, i, image_size=image_size, seed=seed).save(folder / cls / f"{i:03d}.png",
                                                                               compress_level=1)


def ensure_synthetic_dataset(
    cache_dir: Path | None = None, *, per_class: int = 24, image_size: int = 64, seed: int = 0,
    domains: list[str] | None = None,
) -> Path:
    """Generate the demo image folder once and return its root.

    The folder is ``<cache>/synthetic-v1-<hash of the parameters>/<domain>/<class>/<i:03d>.png``
    with ``<cache>`` from :func:`default_cache_dir` unless ``cache_dir`` is given. Only the styles in
    ``domains`` are drawn (None: all of them); each style's folder is drawn once, into a hidden temporary
    sibling that is then renamed into place (it holds a ``.complete`` marker), so it appears atomically;
    when several processes race, the loser deletes its copy and uses the winner's. A style that is complete
    is returned as is, without writing anything.

    Raises:
        DataError: invalid sizes (``data.synthetic_per_class``,
            ``data.synthetic_image_size``), a style the set does not draw (``data.domains``), or a cache
            folder that cannot be written (set ``$FEDCLIP_CACHE_DIR``).
    """
    problems: list[str] = []
    if not isinstance(per_class, int) or per_class < 1:
        problems.append(f"data.synthetic_per_class={per_class!r}: must be >= 1. Fix: e.g. data.synthetic_per_class=24.")
    if not isinstance(image_size, int) or image_size < 16:
        problems.append(
            f"data.synthetic_image_size={image_size!r}: must be >= 16. Fix: e.g. data.synthetic_image_size=64."
        )
    wanted = list(SYNTHETIC_DOMAINS if domains is None else domains)
    unknown = [d for d in wanted if d not in SYNTHETIC_DOMAINS]
    if unknown:
        problems.append(f"data.domains={wanted}: the synthetic set has no style {unknown}. "
                        f"Fix: choose among {SYNTHETIC_DOMAINS}.")
    if problems:
        raise DataError(problems)

    target = synthetic_dataset_dir(cache_dir, per_class=per_class, image_size=image_size, seed=seed)
    if _is_complete(target):  # a folder whose styles were all drawn together, under one marker
        return target
    for domain in wanted:
        if not _is_complete(target / domain):
            _ensure_domain(target, domain, per_class, image_size, seed)
    return target


def _ensure_domain(target: Path, domain: str, per_class: int, image_size: int, seed: int) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{domain}.tmp-", dir=target))
    except OSError as exc:
        raise DataError(
            f"cannot write the synthetic data set to the cache folder {str(target.parent)!r} ({exc}). "
            "Fix: set FEDCLIP_CACHE_DIR to a writable folder."
        ) from None
    final = target / domain
    try:
        _generate_domain(tmp, domain, per_class, image_size, seed)
        (tmp / _COMPLETE).write_text(json.dumps({**_params(per_class, image_size, seed), "domain": domain},
                                                indent=1) + "\n")
        if final.exists() and not _is_complete(final):
            # Left incomplete by something other than this function (which never
            # leaves a partial folder): clear it so the rename can succeed.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final):
                raise
            # Another process finished first: keep its folder, drop ours.
    except OSError as exc:
        raise DataError(
            f"cannot write the synthetic data set to {str(final)!r} ({exc}). "
            "Fix: set FEDCLIP_CACHE_DIR to a writable folder with free space."
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
