"""The frozen-feature cache: exact, reused, invalidated, never trusted blindly."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import PACS_MINI
from fedclip_lightning.configure import check, load_config, to_config
from fedclip_lightning.data.domains import scan_domains
from fedclip_lightning.errors import ConfigError
from fedclip_lightning.federation.orchestrator import run
from fedclip_lightning.model.backbone import load_backbone
from fedclip_lightning.model.features import FeatureCache, encode_images, model_identity


def _run(tmp_path, name, root=PACS_MINI, *more):
    cfg = load_config(["experiment=pacs_mini_debug", f"data.root={root}", "progress=false", "plots=false", "logger=none",
                       f"output_dir={tmp_path / 'outputs'}", f"run_name={name}",
                       f"features.dir={tmp_path / 'features'}", *more])
    return run(cfg)


def test_cached_features_give_the_same_results_as_the_encoder(tmp_path):
    cached = _run(tmp_path, "cached")
    reference = _run(tmp_path, "reference", PACS_MINI, "features=reference")
    assert cached["features"]["cache"] is True and reference["features"] == {"cache": False}
    for block in ("selected", "final"):
        for key in ("client_test_acc", "client_val_acc", "unseen_acc"):
            for name, v in reference[block][key].items():
                assert cached[block][key][name] == pytest.approx(v, abs=1e-5)
    assert cached["selected_round"] == reference["selected_round"]
    # the losses too, row by row
    rows = lambda n: (tmp_path / "outputs" / n / "metrics.csv").read_text().splitlines()[1:]  # noqa: E731
    for a, b in zip(rows("cached"), rows("reference"), strict=True):
        ra, rb = a.split(","), b.split(",")
        assert ra[:3] == rb[:3]
        for x, y in zip(ra[3:], rb[3:]):
            assert (x == y == "") or float(x) == pytest.approx(float(y), abs=1e-5)


def test_second_run_encodes_nothing_and_a_changed_image_invalidates(tmp_path):
    root = tmp_path / "mini"
    shutil.copytree(PACS_MINI, root)
    first = _run(tmp_path, "a", root)["features"]
    assert first["encoded_images"] == 40 and first["cached_images"] == 0
    second = _run(tmp_path, "b", root, "seed=0", "algorithm.lr=1e-3")["features"]
    assert second["encoded_images"] == 0 and second["cached_images"] == 40
    # touch one photo image: its client's set is encoded again, nothing else
    img = next((root / "photo" / "dog").iterdir())
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = _run(tmp_path, "c", root)["features"]
    assert third["encoded_images"] == 10 and third["cached_images"] == 30


def test_truncated_or_mismatched_file_is_rebuilt(tmp_path):
    backbone = load_backbone(load_config(["backbone=tiny_vit"]).backbone)
    samples = scan_domains(PACS_MINI, ["photo"]).samples["photo"]
    ident = model_identity(backbone, "fp32", 0)
    cache = FeatureCache(tmp_path, backbone, ident, batch_size=4, progress=False)
    want = cache.get(samples)
    (path,) = tmp_path.glob("*.pt")
    # truncated
    path.write_bytes(path.read_bytes()[:100])
    again = FeatureCache(tmp_path, backbone, ident, batch_size=4, progress=False)
    assert torch.equal(again.get(samples), want)
    assert again.stats.rebuilt_files == 1 and again.stats.encoded_images == len(samples)
    # a file whose content does not match its name (wrong shape)
    blob = torch.load(path, weights_only=True)
    blob["features"] = blob["features"][:3]
    torch.save(blob, path)
    third = FeatureCache(tmp_path, backbone, ident, batch_size=4, progress=False)
    assert torch.equal(third.get(samples), want) and third.stats.rebuilt_files == 1
    # and a valid file is used as is
    fourth = FeatureCache(tmp_path, backbone, ident, batch_size=4, progress=False)
    assert torch.equal(fourth.get(samples), want) and fourth.stats.cached_images == len(samples)


def test_encode_matches_the_backbone_batch_by_batch():
    backbone = load_backbone(load_config(["backbone=tiny_vit"]).backbone)
    samples = scan_domains(PACS_MINI, ["sketch"]).samples["sketch"]
    feats = encode_images(backbone, samples, batch_size=3, num_workers=0, progress=False)
    from fedclip_lightning.data.domains import ImageDataset

    ds = ImageDataset(samples, backbone.preprocess)
    direct = backbone.image_features(torch.stack([ds[i][0] for i in range(len(ds))]))
    torch.testing.assert_close(feats, direct, atol=1e-5, rtol=1e-5)


def test_cache_refused_where_it_is_not_exact():
    cfg = to_config({"algorithm": {"name": "fedavg", "trainable": "all"}, "features": {"cache": "on"}})
    with pytest.raises(ConfigError, match="features.cache") as err:
        check(cfg)
    assert "not exact" in str(err.value)


def test_a_different_model_never_shares_files(tmp_path):
    backbone = load_backbone(load_config(["backbone=tiny_vit"]).backbone)
    a = model_identity(backbone, "fp32", 0)
    b = model_identity(backbone, "fp32", 1)  # another random init
    c = model_identity(backbone, "bf16", 0)
    fast = load_backbone(load_config(["backbone=tiny_vit", "backbone.precision=bf16"]).backbone)
    d = model_identity(fast, "bf16", 0)  # the class-token-only forward is part of what made the features
    assert fast.clip.class_token_only and d["image_forward"] and "image_forward" not in c
    assert len({json.dumps(x, sort_keys=True) for x in (a, b, c, d)}) == 4


def test_the_cache_is_keyed_by_precision(tmp_path):
    """A bf16 run never reads fp32 features, nor the reverse; each reads its own back."""
    from fedclip_lightning.config import BackboneConfig

    samples = [s for items in scan_domains(PACS_MINI, None).samples.values() for s in items][:12]
    feats, stats = {}, {}
    for precision in ("fp32", "bf16", "fp32", "bf16"):
        backbone = load_backbone(BackboneConfig(name="fedclip-tiny-vit", precision=precision, download=False), seed=0)
        assert backbone.precision == precision
        cache = FeatureCache(tmp_path, backbone, model_identity(backbone, backbone.precision, 0), batch_size=4,
                             progress=False)
        f = cache.get(samples)
        if precision in feats:  # the second time: read back, bitwise
            assert cache.stats.encoded_images == 0 and torch.equal(f, feats[precision])
        else:
            assert cache.stats.encoded_images == len(samples)
            feats[precision] = f
        stats.setdefault(precision, []).append(cache.stats.cached_images)
    assert not torch.equal(feats["fp32"], feats["bf16"])
    assert len(list(tmp_path.glob("*.pt"))) == 2
    cos = torch.nn.functional.cosine_similarity(feats["fp32"], feats["bf16"], dim=-1)
    assert cos.min() > 0.99  # the same model, rounded


def test_fast_precision_is_the_fastest_native_one(monkeypatch):
    from fedclip_lightning.model import backbone as bb

    assert bb.resolve_precision("auto", "cpu") == "fp32" and bb.resolve_precision("auto", "cuda") == "fp16"
    monkeypatch.setattr(bb, "cpu_has_bf16", lambda: True)
    assert bb.resolve_precision("fast", "cpu") == "bf16"
    monkeypatch.setattr(bb, "cpu_has_bf16", lambda: False)
    assert bb.resolve_precision("fast", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert bb.resolve_precision("fast", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert bb.resolve_precision("fast", "cuda") == "fp16"
    for explicit in ("fp32", "bf16", "fp16", "pure_fp16"):
        assert bb.resolve_precision(explicit, "cpu") == explicit
    assert load_config(["backbone.precision=fast"]).backbone.precision == "fast"


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    from fedclip_lightning import numerics
    from fedclip_lightning.model import backbone as bb

    real = numerics.Path

    def fake(text):
        f = tmp_path / "cpuinfo"
        f.write_text(text)
        monkeypatch.setattr(numerics, "Path", lambda p: f if p == "/proc/cpuinfo" else real(p))

    fake("processor : 0\nflags : fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert bb.cpu_has_bf16()
    fake("processor : 0\nflags : fpu sse amx_tile amx_bf16\n")
    assert bb.cpu_has_bf16()
    fake("processor : 0\nflags : fpu sse avx2 avx512f\n")
    assert not bb.cpu_has_bf16()


@pytest.mark.parametrize("backbone_name", ["tiny_vit", "mini_clip"])
def test_uint8_pixels_then_batch_normalisation_are_the_reference_tensors_bit_for_bit(backbone_name):
    """The encoder pass's loader sends uint8 pixels from its workers and normalises the batch: the very
    tensors backbone.preprocess gives image by image (ToTensor then Normalize), every bit."""
    from fedclip_lightning.data.domains import load_rgb
    from fedclip_lightning.model.features import PixelsToBatch, image_loader

    backbone = load_backbone(load_config([f"backbone={backbone_name}"]).backbone)
    samples = [s for items in scan_domains(PACS_MINI, None).samples.values() for s in items]
    pixels = PixelsToBatch(backbone.preprocess)
    assert pixels.split
    reference = torch.stack([backbone.preprocess(load_rgb(s.path)) for s in samples])
    batches = [pixels.finish(x) for x, _ in image_loader(backbone, samples, batch_size=16, num_workers=2,
                                                          pixels=pixels)]
    assert all(b.dtype == torch.float32 for b in batches)
    assert torch.equal(torch.cat(batches), reference)
    # The features of the pass equal the encoder on the reference tensors, in the same calls (fp32 kernels may
    # block by a call's size, so other calls may differ in the last bits: under MKL_CBWR=COMPATIBLE they do).
    from fedclip_lightning.model.features import encode_batch, encoder_chunk

    chunk = encoder_chunk(backbone)
    want = torch.cat([encode_batch(backbone, reference[i:i + 16], chunk) for i in range(0, len(reference), 16)])
    torch.testing.assert_close(encode_images(backbone, samples, batch_size=16, num_workers=0, progress=False),
                               want.float(), rtol=0, atol=0)


@pytest.mark.parametrize("backbone_name", ["tiny_vit", "mini_clip"])
def test_the_encoder_chunk_changes_no_bit_in_bf16_and_only_rounding_in_fp32(backbone_name):
    """The pass encodes each loader batch in equal calls of at most features.encoder_batch_size images
    (auto on a CPU: what stays in the caches). bf16: the same features, every bit, as the whole batch at
    once. fp32: the same to float rounding (the CPU's fp32 matrix kernels block by the call's size)."""
    samples = [s for items in scan_domains(PACS_MINI, None).samples.values() for s in items]
    for precision in ("bf16", "fp32"):
        backbone = load_backbone(load_config([f"backbone={backbone_name}", f"backbone.precision={precision}"]).backbone)

        def features(chunk):
            return encode_images(backbone, samples, batch_size=40, num_workers=0, progress=False,
                                 encoder_batch_size=chunk)

        whole = features(40)
        assert torch.equal(features(None), features(None))  # one configuration, the same bits every time
        for chunk in (1, 3, 7, 16, None):  # 7: calls of 7 and 6 images; 16: 14, 13 and 13
            if precision == "bf16":
                assert torch.equal(features(chunk), whole), chunk
            else:
                torch.testing.assert_close(features(chunk), whole, rtol=1e-4, atol=1e-4)


def test_auto_encoder_chunk_on_the_cpu_is_about_800_tokens():
    import open_clip

    from fedclip_lightning.model.features import encoder_chunk

    def chunk_of(name):
        model = open_clip.create_model(name, pretrained=None)
        return encoder_chunk(SimpleNamespace(clip=SimpleNamespace(model=model), device=torch.device("cpu")))

    assert chunk_of("ViT-B-32") == 16  # 50 tokens
    assert chunk_of("ViT-B-16") == 4  # 197 tokens
    assert chunk_of("RN50") == 4  # a 224-pixel ResNet
    gpu = SimpleNamespace(clip=None, device=torch.device("cuda"))
    assert encoder_chunk(gpu) is None and encoder_chunk(gpu, 8) == 8


def test_a_transform_of_another_shape_stays_whole_in_the_workers():
    from torchvision import transforms as T

    from fedclip_lightning.model.features import PixelsToBatch

    odd = T.Compose([T.Resize(8), T.ToTensor()])  # no Normalize at the end
    pixels = PixelsToBatch(odd)
    assert not pixels.split and pixels.head is odd
    x = torch.rand(2, 3, 8, 8)
    assert pixels.finish(x) is x
