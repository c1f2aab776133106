"""Image folders organised by domain and class.

A data set is a folder laid out as ``<root>/<domain>/<class>/<image>`` (PACS,
VLCS, Office-Home, DomainNet and the synthetic demo set all are).
:func:`scan_domains` indexes such a folder once, checks it, and returns a
:class:`DomainSet`: one shared, sorted class vocabulary (so a label means the
same class in every domain, even where a domain lacks some classes) and a
deterministic, sorted list of :class:`Sample` per domain.

Every problem the user can fix is raised as a :class:`~fedclip_lightning.errors.DataError`
that names the bad value, the config key that set it and the fix; where several
problems can be found in one pass they are reported together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""File name suffixes (lower case, compared case-insensitively) taken as images."""

ON_CORRUPT_CHOICES: tuple[str, ...] = ("error", "skip")

DATASET_DOMAINS: dict[str, list[str]] = {
    "pacs": ["art_painting", "cartoon", "photo", "sketch"],
    "vlcs": ["Caltech101", "LabelMe", "SUN09", "VOC2007"],
    "office_home": ["Art", "Clipart", "Product", "Real_World"],
    "domainnet": ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
}
"""Domain folder names of the usual domain-generalisation benchmarks."""

_MAX_LISTED = 20
_LAYOUT = "<root>/<domain>/<class>/<image>"


@dataclass(frozen=True)
class Sample:
    """One image: its absolute path, its class index and its domain name."""

    path: str
    label: int
    domain: str


@dataclass
class DomainSet:
    """An indexed image folder.

    Attributes:
        root: absolute path of the data set folder.
        classes: sorted union of the class-folder names over all selected
            domains; ``Sample.label`` indexes this list.
        samples: per selected domain (in selection order), its samples sorted
            by path relative to ``root``.
        skipped: absolute paths of corrupt images dropped because
            ``on_corrupt="skip"``.
    """

    root: Path
    classes: list[str]
    samples: dict[str, list[Sample]]
    skipped: list[str] = field(default_factory=list)

    @property
    def domains(self) -> list[str]:
        """The selected domain names, in order."""
        return list(self.samples)


def is_image_file(path: Path) -> bool:
    """True for a non-hidden file whose suffix is an image extension (any case)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _visible_dirs(folder: Path, what: str = "folder") -> list[Path]:
    """Sub-folders of ``folder`` that are not hidden, sorted; a symlink that leads back up the tree (a
    cycle: every image below would count again) is left out with a warning; an unreadable folder is an
    error naming it."""
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot read the {what} {folder} ({exc.strerror}). Fix: make it readable "
                        "(chmod/chown), or leave it out of data.domains.") from None
    out = []
    real = folder.resolve()
    for p in entries:
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink():
            target = p.resolve()
            if target == real or target in real.parents:
                log.warning("ignoring %s: a symlink to %s, which contains it (its images would count twice)",
                            p, target)
                continue
        out.append(p)
    return sorted(out)


# The first bytes of the image formats PIL reads here: a file without an extension that starts so is an image.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _images_under(folder: Path, unnamed: list[Path] | None = None) -> list[Path]:
    """Image files anywhere below ``folder``, skipping hidden files and folders (symlinked sub-folders
    are not followed); a folder that cannot be read is an error naming it, never skipped silently.
    Files without an extension whose bytes are an image go to ``unnamed`` (the caller refuses them)."""
    found: list[Path] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=errors.append):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath)
        found.extend(base / f for f in filenames if is_image_file(base / f))
        if unnamed is not None:
            unnamed.extend(base / f for f in filenames
                           if not f.startswith(".") and "." not in f and _looks_like_image(base / f))
    if errors:
        e = errors[0]
        raise DataError(f"cannot read {e.filename} ({e.strerror}): its images would be left out without a word. "
                        "Fix: make it readable (chmod/chown), or move it out of the data set.")
    return found


def _similar_class_names(classes: list[str]) -> list[list[str]]:
    """Groups of class folder names that differ only by case or surrounding whitespace."""
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(c.strip().casefold(), []).append(c)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _check_image(path: str) -> str | None:
    """``None`` when PIL can open, verify and decode ``path``, else the reason it cannot.

    ``verify`` checks the file's structure (PNG checksums) but not the compressed image data: a
    truncated JPEG passes it and then fails when decoded, mid-run. So the image is decoded too, cheaply:
    JPEGs in draft mode (the DCT scaled down 8x, which still reads every byte of the stream).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def _find_corrupt(paths: Sequence[str]) -> dict[str, str]:
    """Map each unreadable image among ``paths`` to the reason."""
    if not paths:
        return {}
    workers = min(8, (os.cpu_count() or 1) + 2, len(paths))
    if workers <= 1:
        results = [_check_image(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_check_image, paths, chunksize=64))
    return {p: why for p, why in zip(paths, results) if why is not None}


def _listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def scan_domains(
    root: str | os.PathLike[str],
    domains: list[str] | None = None,
    *,
    on_corrupt: str = "error",
    check_images: bool = True,
    single_domain_classes: bool = False,
) -> DomainSet:
    """Index ``<root>/<domain>/<class>/<image>`` and check it.

    Args:
        root: the data set folder (config ``data.root``).
        domains: domain folders to use, in this order (``data.domains``);
            ``None`` takes every non-hidden sub-folder of ``root``, sorted.
        on_corrupt: ``"error"`` raises on images PIL cannot read; ``"skip"``
            drops them and lists them in :attr:`DomainSet.skipped`
            (``data.on_corrupt``).
        check_images: run ``PIL.Image.verify`` on every image (about 1.5 s
            for all of PACS); ``False`` trusts the files (``data.check_images``).
        single_domain_classes: accept a class folder that only one of three or
            more domains has (``data.single_domain_classes``); refused by
            default, as it is most often another name for a class the other
            domains have (``husky`` beside ``dog``), which would split one class
            in two.

    Hidden files and folders and files without an image extension are ignored.
    Images may sit in sub-folders of a class folder. A class is a class folder
    holding at least one image; the vocabulary is the sorted union over all
    selected domains.

    Raises:
        DataError: root missing; a requested domain missing; a domain without
            images; no classes; no class common to all domains; corrupt images
            (with ``on_corrupt="error"``). Problems found in the same pass are
            reported together.
    """
    if on_corrupt not in ON_CORRUPT_CHOICES:
        raise DataError(
            f"data.on_corrupt={on_corrupt!r}: unknown value. Fix: use one of {', '.join(ON_CORRUPT_CHOICES)}."
        )
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(
            f"data.root={str(root)!r}: the folder does not exist. "
            f"Fix: set data.root to a data set folder laid out as {_LAYOUT}."
        )
    if not root_path.is_dir():
        raise DataError(
            f"data.root={str(root)!r}: not a folder. Fix: set data.root to a data set folder laid out as {_LAYOUT}."
        )
    root_path = root_path.resolve()
    available = [p.name for p in _visible_dirs(root_path)]

    problems: list[str] = []
    if domains is None:
        selected = available
        if not selected:
            raise DataError(
                f"data.root={str(root)!r}: has no domain sub-folders. "
                f"Fix: point data.root at a folder laid out as {_LAYOUT}."
            )
    else:
        selected = list(dict.fromkeys(domains))
        missing = [d for d in selected if d not in available]
        if missing:
            problems.append(
                f"data.domains={list(domains)!r}: {missing} not found under {root_path}"
                f" (domains there: {available or 'none'}). "
                "Fix: name existing domain folders in data.domains, or set it to null to use them all."
            )
        selected = [d for d in selected if d in available]

    # domain -> class -> image paths
    found: dict[str, dict[str, list[Path]]] = {}
    unnamed: list[Path] = []
    for d in selected:
        dom_dir = root_path / d
        per_class: dict[str, list[Path]] = {}
        for cdir in _visible_dirs(dom_dir, f"domain folder {d!r}"):
            imgs = _images_under(cdir, unnamed)
            if imgs:
                per_class[cdir.name] = imgs
        if not per_class:
            loose = [p for p in dom_dir.iterdir() if p.is_file() and is_image_file(p)]
            hint = (
                f" (it has {len(loose)} image files directly inside it but no class sub-folders)" if loose else ""
            )
            problems.append(
                f"data.domains: domain {d!r} has no images in class folders under {dom_dir}{hint}. "
                f"Fix: lay it out as {_LAYOUT}, or leave {d!r} out of data.domains."
            )
        found[d] = per_class

    if unnamed:
        problems.append(
            f"{len(unnamed)} image file(s) without an extension under data.root={str(root)!r} would be left out "
            f"without a word: {_listing([str(p) for p in sorted(unnamed)])}. Fix: give them their extension "
            "(.jpg, .png...), or move them out of the data set."
        )
    classes = sorted({c for per_class in found.values() for c in per_class})
    for group in _similar_class_names(classes):
        log.warning("class folders %s differ only by case or whitespace: they are %d different classes. "
                    "Rename them to one name if they are one class.", [repr(g) for g in group], len(group))
    if selected and not classes:
        problems.append(
            f"data.root={str(root)!r}: no class folders with images in domains {selected}. "
            f"Fix: lay the data out as {_LAYOUT}."
        )
    nonempty = {d: set(pc) for d, pc in found.items() if pc}
    if len(nonempty) >= 2 and not set.intersection(*nonempty.values()):
        detail = "; ".join(f"{d}: {sorted(cs)}" for d, cs in nonempty.items())
        problems.append(
            f"data.domains={list(nonempty)!r}: no class is common to all these domains ({detail}). "
            "Fix: choose domains of the same data set in data.domains, or rename class folders so they agree."
        )
    if len(nonempty) >= 3 and not single_domain_classes:
        for c in classes:
            having = [d for d, cs in nonempty.items() if c in cs]
            if len(having) == 1:
                others = sorted(set().union(*(cs for d, cs in nonempty.items() if d != having[0])) -
                                nonempty[having[0]])
                problems.append(
                    f"class folder {c!r} is only in domain {having[0]!r} of {len(nonempty)} domains"
                    + (f" (which lacks {others}, found in the others)" if others else "") + ": if it is that "
                    "domain's name for a class the others have, it would become a class of its own. Fix: rename "
                    "the folder to the others' name, or set data.single_domain_classes=true if the class exists "
                    "in that domain only."
                )
    if problems:
        raise DataError(problems)

    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[Sample]] = {}
    for d, per_class in found.items():
        entries = [
            (p.relative_to(root_path).as_posix(), str(p), index[c]) for c, paths in per_class.items() for p in paths
        ]
        entries.sort()
        samples[d] = [Sample(path=path, label=label, domain=d) for _, path, label in entries]

    ds = DomainSet(root=root_path, classes=classes, samples=samples)
    return verify_images(ds, on_corrupt) if check_images else ds


def verify_images(ds: DomainSet, on_corrupt: str = "error") -> DomainSet:
    """Check every image of ``ds`` with ``PIL.Image.verify``.

    Raises DataError naming the corrupt files (``on_corrupt="error"``), or
    returns ``ds`` without them, listed in ``skipped`` (``on_corrupt="skip"``).
    Separate from :func:`scan_domains` so that a subset is checked, not the
    whole folder.
    """
    root_path, samples = ds.root, ds.samples
    skipped: list[str] = list(ds.skipped)
    all_paths = [s.path for d in samples for s in samples[d]]
    bad = _find_corrupt(all_paths)
    if bad:
        bad_list = [p for p in all_paths if p in bad]
        if on_corrupt == "error":
            described = [f"{p} ({bad[p]})" for p in bad_list]
            raise DataError(
                f"{len(bad_list)} corrupt or unreadable image(s) under data.root={str(root_path)!r}: "
                f"{_listing(described)}. "
                "Fix: delete or replace it, or set data.on_corrupt=skip to leave such files out."
            )
        skipped += bad_list
        bad_set = set(bad_list)
        samples = {d: [s for s in ss if s.path not in bad_set] for d, ss in samples.items()}
        emptied = [d for d, ss in samples.items() if not ss]
        if emptied:
            raise DataError(
                f"data.domains: domain(s) {emptied} have no readable images left after skipping "
                f"{len(skipped)} corrupt file(s) (data.on_corrupt=skip). "
                "Fix: replace the corrupt images, or leave these domains out of data.domains."
            )
    return DomainSet(root=root_path, classes=ds.classes, samples=samples, skipped=skipped)


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image and return it in RGB mode, whatever its stored mode.

    Palette images with transparency and images with an alpha channel are
    composited on white, so transparent areas do not turn black.

    Raises:
        DataError: the file is missing or cannot be decoded (names the file).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "RGBa"):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if im.mode.startswith("I;16") or im.mode in ("I", "F"):
                # High bit-depth greyscale: rescale to 8 bits before converting.
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                return Image.fromarray(scaled.astype("uint8"), mode="L").convert("RGB")
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - report any decoding failure as a data problem
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot read image {os.fspath(path)!r} ({reason}). "
            "Fix: delete or replace it, or set data.on_corrupt=skip (with data.check_images=true) to leave it out."
        ) from None


class ImageDataset(torch.utils.data.Dataset):
    """A map-style data set over :class:`Sample` items.

    ``dataset[i]`` is ``(transform(load_rgb(path)), label)``; with
    ``transform=None`` the RGB :class:`PIL.Image.Image` itself is returned.
    """

    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.samples[index]
        image = load_rgb(sample.path)
        if self.transform is not None:
            return self.transform(image), sample.label
        return image, sample.label

    @property
    def labels(self) -> list[int]:
        """The label of every item, in order (no image is opened)."""
        return [s.label for s in self.samples]
