"""The data each rank works on: per (participant index, split), a data set of cached frozen features
(each image encoded once, or read from the feature cache) or of images (encoder in every step)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..algorithms.registry import uses_feature_cache
from ..config import Config
from ..data.domains import ImageDataset
from ..data.pipeline import feature_dataset
from ..data.synthetic import default_cache_dir
from ..model.features import FeatureCache, default_workers, model_identity
from ..aggregation.rows import gather_rows


def build_datasets(cfg: Config, fabric, backbone, task, mine) -> tuple[dict, dict]:
    """``({(index, split): data set}, feature statistics summed over ranks)``.

    With the cache, each rank encodes the images of its own participants in one
    encoder pass (or loads them from disk) before the first round.
    """
    datasets: dict[tuple[int, str], object] = {}
    cache = _cache(cfg, fabric, backbone) if uses_feature_cache(cfg) else None
    splits_of = {}
    for p in mine:
        if p.kind == "client":
            c = task.clients[p.index]
            splits_of[p.index] = {"train": c.train, "val": c.val, "test": c.test}
        else:
            splits_of[p.index] = {"unseen": task.unseen[p.name]}
    if cache is None:
        for i, splits in splits_of.items():
            for split, samples in splits.items():
                datasets[(i, split)] = ImageDataset(samples, backbone.preprocess)
        return datasets, {"cache": False}
    sets = [[s for samples in splits.values() for s in samples] for splits in splits_of.values()]
    for (i, splits), feats in zip(splits_of.items(), cache.get_many(sets, desc="encoding")):
        offset = 0
        for split, samples in splits.items():
            datasets[(i, split)] = feature_dataset(feats[offset : offset + len(samples)], samples)
            offset += len(samples)
    # Summed over ranks: how many images this run encoded, and how many came from disk.
    local = torch.tensor([cache.stats.encoded_images, cache.stats.cached_images, cache.stats.rebuilt_files,
                          cache.stats.encode_seconds], dtype=torch.float64)
    total = gather_rows(fabric, {fabric.global_rank: local}, fabric.world_size, 4, torch.float64)
    return datasets, {
        "cache": True,
        "dir": str(cache.root) if cache.root else None,
        "encoded_images": int(total[:, 0].sum()),
        "cached_images": int(total[:, 1].sum()),
        "rebuilt_files": int(total[:, 2].sum()),
        "encode_seconds_max_rank": round(float(total[:, 3].max()), 3),
    }


def _cache(cfg: Config, fabric, backbone) -> FeatureCache:
    fc = cfg.features
    root = None
    if fc.persist:
        root = Path(fc.dir).expanduser() if fc.dir else default_cache_dir() / "features"
    return FeatureCache(root, backbone, model_identity(backbone, backbone.precision, cfg.seed),
                        batch_size=fc.batch_size,
                        num_workers=fc.num_workers if fc.num_workers is not None else default_workers(),
                        encoder_batch_size=fc.encoder_batch_size,
                        progress=cfg.progress and fabric.is_global_zero and sys.stderr.isatty())
