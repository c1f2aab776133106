"""Frozen-feature cache: encode each image once, train the adapter on features.

FedCLIP freezes both encoders and its preprocessing has no augmentation, so the
frozen image feature of an image never changes during training. Encoding every
image once before the first round, and training and evaluating the adapter on
those features, gives the same model as running the encoder on every batch of
every round, for a fraction of the work.

On disk, one file per image set (a client's images, an unseen domain) under
``<cache dir>/features/``, named by a SHA-256 of everything that changes a
feature: the model (name, weights file path+size+mtime or the random-init
seed), its precision, the preprocessing transform, and each image's path, size
and mtime. A changed input gets a new name (a miss); later runs and sweeps over
learning rates or seeds reuse the file. Files are written atomically (temp file,
then rename) with a SHA-256 of their feature bytes, and checked on load (key,
shape, dtype, finiteness and that checksum): a truncated, mismatched or
bit-flipped file is rebuilt with a warning, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.domains import ImageDataset, Sample
from ..config import FEATURE_CACHE_MODES, FeaturesConfig
from ..errors import ConfigError, Problems
from ..files import atomic_save
from .backbone import Backbone, image_size, tokens_per_image

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: a SHA-256 of the feature bytes, checked on every load


def model_identity(backbone: Backbone, precision: str, seed: int) -> dict:
    """Everything about the encoder that changes its output: architecture (open_clip's config and the
    creation options, QuickGELU included), weights, precision and preprocessing."""
    import open_clip

    ident: dict = {"name": backbone.name, "precision": precision, "preprocess": repr(backbone.preprocess),
                   "model_config": open_clip.get_model_config(backbone.name)
                   if not backbone.name.startswith(("hf-hub:", "local-dir:")) else None,
                   "create_options": {k: v for k, v in sorted(backbone.create_options.items())}}
    if getattr(backbone.clip, "class_token_only", False):  # bf16: the last block's MLP on the class token alone
        ident["image_forward"] = "class-token-only last block"
    if backbone.weights_file:
        st = os.stat(backbone.weights_file)
        ident["weights"] = [os.path.abspath(backbone.weights_file), st.st_size, st.st_mtime_ns]
    elif backbone.name.startswith(("hf-hub:", "local-dir:")):
        # Weights behind a name can change: fingerprint the loaded tensors themselves.
        ident["weights"] = [backbone.name, weights_fingerprint(backbone.clip)]
    else:
        ident["weights"] = ["random-init", seed]
    return ident


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and bytes (about a second for ViT-B-32)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def images_identity(samples: list[Sample]) -> list:
    out = []
    for s in samples:
        st = os.stat(s.path)
        out.append([s.path, st.st_size, st.st_mtime_ns])
    return out


def kernels_identity(device: torch.device) -> dict:
    """What picks the encoder's kernels, hence the last bits of its features: the CPU's kernel set, thread
    count and numerics settings (``fedclip_lightning.numerics``), or the GPU model and its libraries."""
    from .. import numerics

    ident: dict = {"torch": torch.__version__}
    if device.type == "cuda":
        ident.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version())
    else:
        info = numerics.describe()
        ident.update(cpu=info["cpu"], capability=info["cpu_capability"], threads=info["threads"], env=info["env"])
    return ident


def cache_key(model_ident: dict, samples: list[Sample], encoding: dict | None = None) -> str:
    """The file name of a set's features: everything that changes their bits. ``encoding``: how the pass
    ran (loader batch, encoder call size, kernels), since fp32 kernels block by the call's size."""
    blob = json.dumps({"v": FORMAT_VERSION, "model": model_ident, "images": images_identity(samples),
                       "encoding": encoding}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class CacheStats:
    encoded_images: int = 0
    cached_images: int = 0
    encode_seconds: float = 0.0
    rebuilt_files: int = 0


def default_workers() -> int:
    """Decoding workers for the encoder pass when ``features.num_workers`` is null: ``min(8, cores)``.

    Measured on 2 cores (benchmarks/encoder_pass.py): decoding and preprocessing a PACS image costs about
    1.4 ms of one core against 12 ms (bf16) to 50 ms (fp32) of two for ViT-B/32; the workers decode
    while the encoder runs.
    """
    return max(1, min(8, os.cpu_count() or 1))


class PixelsToBatch:
    """``backbone.preprocess`` split in two where that gives the same tensors bit for bit: the workers
    decode, resize and crop and send uint8 pixels (a quarter of the bytes of fp32, and no per-image float
    work); the batch is scaled and normalised in one vectorised step (``finish``), on the device the
    encoder runs on. ToTensor's ``x.float() / 255`` then Normalize's ``(x - mean) / std`` are the same
    per-element float operations either way (tests/test_features.py checks the bits). A transform of
    another shape is left whole in the workers (``finish`` is then the identity)."""

    def __init__(self, preprocess):
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        self.split = (len(steps) >= 2 and isinstance(steps[-1], T.Normalize) and isinstance(steps[-2], T.ToTensor)
                      and not steps[-1].inplace)  # open_clip's MaybeToTensor is a ToTensor
        self.head = T.Compose(steps[:-2]) if self.split else preprocess
        if self.split:
            self.mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, image):
        """Worker side: the image as uint8 ``[C, H, W]`` (or the whole transform's output)."""
        if not self.split:
            return self.head(image)
        import numpy as np

        pic = self.head(image)
        if pic.mode != "RGB":  # ImageDataset hands over RGB and the open_clip transforms keep it
            pic = pic.convert("RGB")
        return torch.from_numpy(np.asarray(pic, dtype=np.uint8).copy()).permute(2, 0, 1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Batch side: ``(x / 255 - mean) / std`` in fp32, as ToTensor then Normalize compute it."""
        if not self.split:
            return x
        # In place on the new tensor: the same operations, element by element, without two more copies
        # of the batch (a third of the time on a CPU: 60 against 180 ms for 256 ViT images).
        x = x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.clone()
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def image_loader(backbone: Backbone, samples: list[Sample], *, batch_size: int, num_workers: int,
                 pixels: PixelsToBatch | None = None, set_sizes: list[int] | None = None) -> DataLoader:
    """The encoder pass's loader: decode + preprocess (``backbone.preprocess``, the reference pixels) in
    ``num_workers`` processes, two batches ahead each, pinned memory for a GPU. With ``pixels`` the
    workers send uint8 pixels and ``pixels.finish`` completes each batch. ``set_sizes``: ``samples`` is
    that many image sets one after another, and no batch crosses from one into the next (so a set's
    features do not depend on what was encoded beside it)."""
    transform = pixels if pixels is not None else backbone.preprocess
    if set_sizes is None:
        set_sizes = [len(samples)]
    if sum(set_sizes) != len(samples):
        raise ValueError(f"set sizes {set_sizes} do not add up to {len(samples)} samples")
    batches, start = [], 0
    for n in set_sizes:
        batches += [list(range(i, min(i + batch_size, start + n))) for i in range(start, start + n, batch_size)]
        start += n
    return DataLoader(ImageDataset(samples, transform), batch_sampler=batches,
                      num_workers=num_workers, pin_memory=backbone.device.type == "cuda",
                      persistent_workers=False, prefetch_factor=2 if num_workers else None)


# About this many tokens per encoder call on a CPU: where one call's activations stay in the caches.
# Measured on 2 cores with 1 MiB L2 each (benchmarks/encoder_pass.py, bf16): ViT-B/32 (50 tokens) runs at
# 85 img/s in calls of 16 images against 74 at 64 and 62 at 256; ViT-B/16 (197 tokens) 19-21 img/s in
# calls of 4-2 against 15 at 64; RN50 43 img/s in calls of 4 against 26 at 64 (fp32: 24 against 12).
CPU_TOKENS_PER_CALL = 800


def encoder_chunk(backbone: Backbone, requested: int | None = None) -> int | None:
    """Images per encoder call within a loader batch (``features.encoder_batch_size``; None: the whole
    batch). Auto (``requested`` None): on a GPU the whole batch; on a CPU about ``CPU_TOKENS_PER_CALL``
    tokens' worth for a vision transformer (16 images for ViT-B/32, 4 for ViT-B/16), and the same share
    of a 224-pixel ResNet's activations (4 images at 224 px) for other towers. A batch is cut into equal
    calls (``encode_batch``).

    The bits: in bf16 an image's features do not depend on the call's size (measured on ViT-B/32 and the
    test models, 1 to 40 images a call; tests/test_features.py checks it). In fp32 the CPU's matrix
    kernels block by the call's size, so calls of different sizes can differ in the last bits (up to
    7e-7 on ViT-B/32, 3e-5 on the test ResNet), as different ``features.batch_size`` values and a short
    last batch always could; one configuration gives the same bits on every run."""
    if requested is not None:
        return requested
    if backbone.device.type != "cpu":
        return None
    visual = backbone.clip.model.visual
    tokens = tokens_per_image(visual)
    if tokens is not None:
        return max(1, CPU_TOKENS_PER_CALL // tokens)
    h, w = image_size(visual)
    return max(1, round(4 * 224 * 224 / (h * w)))


def encoder_calls(x: torch.Tensor, chunk: int | None) -> list[torch.Tensor]:
    """A batch cut into equal calls of at most ``chunk`` images (None: one call). A batch of 40 in chunks
    of 16 is three calls of 14, 13 and 13: no short remainder."""
    return [x] if chunk is None or chunk >= len(x) else list(x.tensor_split(-(-len(x) // chunk)))


def encode_batch(backbone: Backbone, x: torch.Tensor, chunk: int | None,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The frozen image features of one batch, in ``encoder_calls(x, chunk)``. ``finish``
    (``PixelsToBatch.finish``) completes the preprocessing of each call's images just before it: while
    they are in the caches (on a CPU, 256 ViT images normalised and cast to bf16 in calls of 16 take 20
    ms, at once 90)."""
    feats = [backbone.image_features(finish(part) if finish is not None else part)
             for part in encoder_calls(x, chunk)]
    return feats[0] if len(feats) == 1 else torch.cat(feats)


@torch.inference_mode()
def encode_images(backbone: Backbone, samples: list[Sample], *, batch_size: int, num_workers: int,
                  desc: str = "encoding", progress: bool = True, encoder_batch_size: int | None = None,
                  set_sizes: list[int] | None = None) -> torch.Tensor:
    """Raw frozen image features ``[N, d]`` (fp32, CPU) in the order of ``samples``.

    DataLoader workers decode in parallel (uint8 pixels), pinned memory feeds the GPU, the batch is
    normalised on the device, the encoder runs in its configured precision under inference mode, in
    calls of ``encoder_chunk(backbone, encoder_batch_size)`` images.
    """
    pixels = PixelsToBatch(backbone.preprocess)
    chunk = encoder_chunk(backbone, encoder_batch_size)
    loader = image_loader(backbone, samples, batch_size=batch_size, num_workers=num_workers, pixels=pixels,
                          set_sizes=set_sizes)
    out = torch.empty(len(samples), backbone.embed_dim, dtype=torch.float32)
    i = 0
    with tqdm(total=len(samples), desc=desc, unit="img", dynamic_ncols=True, disable=not progress,
              leave=False) as bar:
        for x, _ in loader:
            f = encode_batch(backbone, x.to(backbone.device, non_blocking=True), chunk, pixels.finish)
            out[i : i + len(f)] = f.float().cpu()
            i += len(f)
            bar.update(len(f))
    return out


class FeatureCache:
    """Features of image sets, on disk under ``root`` (or in memory only when ``root`` is None)."""

    def __init__(self, root: Path | None, backbone: Backbone, model_ident: dict, *, batch_size: int = 256,
                 num_workers: int = 0, progress: bool = True, encoder_batch_size: int | None = None):
        self.root = root
        self.backbone = backbone
        self.model_ident = model_ident
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.encoder_batch_size = encoder_batch_size
        self.progress = progress
        self.stats = CacheStats()
        # A set's features are a function of its key: each set is encoded in batches of its own, and the
        # key names the batch, the call size and the kernels (a cache filled by another configuration or
        # machine is not read as if it were this one's).
        self.encoding = {"batch_size": batch_size, "encoder_chunk": encoder_chunk(backbone, encoder_batch_size),
                         "kernels": kernels_identity(backbone.device)}
        if root is not None:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"features.dir={str(root)!r}: cannot create the feature cache ({exc.strerror}). "
                                  "Fix: set features.dir to a folder you can write to, or features.persist=false.") from None

    def path_for(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.pt"

    def get(self, samples: list[Sample], desc: str = "encoding") -> torch.Tensor:
        """Features of ``samples`` (in order): from disk when a valid file exists, else encoded and saved."""
        return self.get_many([samples], desc)[0]

    def get_many(self, sets: list[list[Sample]], desc: str = "encoding") -> list[torch.Tensor]:
        """Features of several image sets (a rank's clients and unseen domains), each from its file when
        valid; the missing ones are encoded together in one pass (one set of loader workers, full batches
        across set boundaries), then saved one file per set."""
        keys = [cache_key(self.model_ident, samples, self.encoding) for samples in sets]
        out: list[torch.Tensor | None] = [None] * len(sets)
        for i, (samples, key) in enumerate(zip(sets, keys)):
            path = self.path_for(key)
            if path is not None and path.exists():
                feats = self._load(path, key, len(samples))
                if feats is not None:
                    self.stats.cached_images += len(samples)
                    out[i] = feats
                    continue
                self.stats.rebuilt_files += 1
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            todo = [s for i in missing for s in sets[i]]
            t0 = time.perf_counter()
            feats = encode_images(self.backbone, todo, batch_size=self.batch_size, num_workers=self.num_workers,
                                  desc=desc, progress=self.progress, encoder_batch_size=self.encoder_batch_size,
                                  set_sizes=[len(sets[i]) for i in missing])
            self.stats.encode_seconds += time.perf_counter() - t0
            self.stats.encoded_images += len(todo)
            offset = 0
            for i in missing:
                n = len(sets[i])
                out[i] = feats[offset : offset + n].clone() if len(missing) > 1 else feats
                offset += n
                path = self.path_for(keys[i])
                if path is not None:
                    self._save(path, keys[i], out[i])
        return out

    def _load(self, path: Path, key: str, n: int) -> torch.Tensor | None:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            feats = blob["features"]
            ok = (blob.get("key") == key and blob.get("version") == FORMAT_VERSION and isinstance(feats, torch.Tensor)
                  and tuple(feats.shape) == (n, self.backbone.embed_dim) and feats.dtype == torch.float32
                  and bool(torch.isfinite(feats).all()) and blob.get("sha256") == _digest(feats))
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is rebuilt
            log.warning("feature cache file %s is unreadable (%s); rebuilding it", path, exc)
            return None
        if not ok:
            log.warning("feature cache file %s does not match its key or checksum; rebuilding it", path)
            return None
        return feats

    def _save(self, path: Path, key: str, feats: torch.Tensor) -> None:
        atomic_save({"version": FORMAT_VERSION, "key": key, "sha256": _digest(feats),
                     "model": json.dumps(self.model_ident, sort_keys=True, default=str), "features": feats}, path)


def _digest(feats: torch.Tensor) -> str:
    """SHA-256 of a feature table's bytes (about 50 ms for all of PACS at d=512)."""
    return hashlib.sha256(feats.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def check_config(fc: FeaturesConfig, p: Problems) -> None:
    """The ``features.*`` keys' own problems (whether caching is exact for the algorithm: ``configure``)."""
    p.choice("features.cache", fc.cache, FEATURE_CACHE_MODES)
    p.positive_int("features.batch_size", fc.batch_size)
    if fc.num_workers is not None:
        p.positive_int("features.num_workers", fc.num_workers, 0)
    if fc.encoder_batch_size is not None:
        p.positive_int("features.encoder_batch_size", fc.encoder_batch_size)
