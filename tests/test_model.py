"""Tests of the model: the attention adapter, the frozen backbone, the client and its losses.

Everything runs for real on the CPU: tiny random open_clip models (``fedclip-tiny-vit``,
``fedclip-tiny-rn``) and one randomly initialised ViT-B-32 for the paper's parameter counts,
fed with real PACS_mini images.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedclip_lightning.client import AdapterClient
from fedclip_lightning.config import AlgorithmConfig, BackboneConfig
from fedclip_lightning.data.domains import ImageDataset, scan_domains
from fedclip_lightning.data.pipeline import make_loader
from fedclip_lightning.errors import BackboneError
from fedclip_lightning.fit_plan import FitPlan
from fedclip_lightning.training import local_fit
from lightning.fabric import Fabric
from fedclip_lightning.model import backbone as backbone_mod
from fedclip_lightning.model.adapter import AttentionAdapter
from helpers import num_adapter_params
from fedclip_lightning.model.backbone import Backbone, FrozenCLIP, load_backbone

TINY = ["fedclip-tiny-vit", "fedclip-tiny-rn"]
ADAPTER_KEYS = {"adapter.fc1.weight", "adapter.fc1.bias", "adapter.fc2.weight", "adapter.fc2.bias"}


# -- helpers -------------------------------------------------------------------------------------

def tiny(name: str = "fedclip-tiny-vit", seed: int = 0) -> Backbone:
    return load_backbone(BackboneConfig(name=name, pretrained=None, download=False), seed=seed)


def adapter_by_hand(adapter: AttentionAdapter, feats: torch.Tensor) -> torch.Tensor:
    """The paper's adapter (arXiv 2302.13485): I* = normalize(softmax(W2 tanh(W1 I + b1) + b2) * I), in fp32."""
    i = feats.float()
    w1, b1 = adapter.fc1.weight.detach().float(), adapter.fc1.bias.detach().float()
    w2, b2 = adapter.fc2.weight.detach().float(), adapter.fc2.bias.detach().float()
    att = torch.softmax(torch.tanh(i @ w1.T + b1) @ w2.T + b2, dim=-1)
    return F.normalize(att * i, dim=-1)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module``, cloned."""
    out = {f"param:{k}": v.detach().clone() for k, v in module.named_parameters()}
    out.update({f"buffer:{k}": v.detach().clone() for k, v in module.named_buffers()})
    return out


@pytest.fixture(scope="module")
def mini(pacs_mini: Path):
    return scan_domains(pacs_mini)


def real_batch(mini, backbone: Backbone, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (through the backbone's own eval transform) and labels of chosen PACS_mini samples."""
    samples = [s for d in mini.domains for s in mini.samples[d]]
    ds = ImageDataset([samples[i] for i in indices], backbone.preprocess)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def prompt_features(backbone: Backbone, classes: list[str]) -> torch.Tensor:
    """Normalised "a picture of a {c}" features, computed from the raw open_clip model."""
    with torch.no_grad():
        t = backbone.clip.model.encode_text(backbone.tokenizer([f"a picture of a {c}" for c in classes])).float()
    return t / t.norm(dim=-1, keepdim=True)


# -- adapter -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 64])
def test_adapter_matches_formula(dim):
    torch.manual_seed(0)
    adapter = AttentionAdapter(dim)
    feats = torch.randn(5, dim) * 3
    out = adapter(feats)
    assert out.shape == (5, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, adapter_by_hand(adapter, feats), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5), rtol=1e-6, atol=1e-6)
    # No residual, no bottleneck: exactly the two d x d layers.
    assert [tuple(p.shape) for p in adapter.parameters()] == [(dim, dim), (dim,), (dim, dim), (dim,)]
    # The result is not just normalize(I): the attention matters.
    assert not torch.allclose(out, F.normalize(feats, dim=-1), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_computes_in_fp32_for_half_input(dtype):
    torch.manual_seed(1)
    adapter = AttentionAdapter(64)
    feats = (torch.randn(6, 64) * 2).to(dtype)
    out = adapter(feats)
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    # Same as the fp32 computation on the (already rounded) input, to fp32 precision.
    torch.testing.assert_close(out, adapter_by_hand(adapter, feats.float()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(6), rtol=1e-6, atol=1e-6)


# -- parameter counts ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b32() -> Backbone:
    return load_backbone(BackboneConfig(name="ViT-B-32", pretrained=None, download=False))


def test_num_adapter_params():
    assert num_adapter_params(512) == 525_312
    assert num_adapter_params(64) == 2 * (64 * 64 + 64)


def test_vit_b32_counts(vit_b32):
    assert vit_b32.embed_dim == 512
    adapter = AttentionAdapter(vit_b32.embed_dim)
    assert sum(p.numel() for p in adapter.parameters()) == 525_312 == num_adapter_params(vit_b32.embed_dim)
    assert sum(p.numel() for p in vit_b32.clip.parameters()) == 151_277_313
    assert not any(p.requires_grad for p in vit_b32.clip.parameters())
    assert vit_b32.weights_file is None and vit_b32.pretrained is None


# -- the class-token path ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fedclip-tiny-vit", "ViT-B-32"])
def test_bf16_class_token_path_gives_the_towers_own_bits(name, mini):
    """In bf16 a vision transformer that pools its class token runs its last block's MLP on that token
    alone: the same features, every bit, as open_clip's own forward, for calls of 1, 3 and 6 images (bf16 on
    a CPU without bf16 units is slow: ViT-B/32 pays about half a second an image, so it is checked on 1 and 3)."""
    bb = load_backbone(BackboneConfig(name=name, pretrained=None, precision="bf16", download=False))
    assert bb.clip.class_token_only
    sizes = (1, 3) if name == "ViT-B-32" else (1, 3, 6)
    x, _ = real_batch(mini, bb, list(range(max(sizes))))
    for n in sizes:
        own = bb.clip.model.encode_image(x[:n].to(torch.bfloat16)).float()
        assert torch.equal(bb.image_features(x[:n]), own), n


def test_the_reference_numerics_keep_the_towers_own_forward():
    """fp32 (and fp16, the reference's GPU numerics) run open_clip's forward as it is; ResNets always do."""
    assert not tiny("fedclip-tiny-vit").clip.class_token_only
    fp16 = load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=None, precision="fp16", download=False))
    assert fp16.precision == "fp16" and not fp16.clip.class_token_only
    rn = load_backbone(BackboneConfig(name="fedclip-tiny-rn", pretrained=None, precision="bf16", download=False))
    assert not rn.clip.class_token_only


def test_a_tower_the_class_token_path_does_not_reproduce_keeps_its_forward(caplog):
    """A tower of the right types whose forward does something else (a patched block, another release):
    the check at load finds the difference, warns and keeps the full forward."""
    import open_clip

    model = open_clip.create_model("fedclip-tiny-vit", pretrained=None, precision="pure_bf16")
    block = model.visual.transformer.resblocks[-1]
    plain = block.forward
    block.forward = lambda x, **kw: plain(x, **kw) + x.mean(dim=1, keepdim=True)  # mixes tokens after the MLP
    assert backbone_mod.class_token_tower(model)
    with caplog.at_level("WARNING"):
        clip = FrozenCLIP(model, class_token_only=True)
    assert not clip.class_token_only and "class-token path does not reproduce" in caplog.text
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    assert torch.equal(clip.encode_image(x), model.encode_image(x).float())


# -- frozen backbone -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_backbone_fully_frozen(name):
    bb = tiny(name)
    params = dict(bb.clip.named_parameters())
    assert params and not any(p.requires_grad for p in params.values())
    assert "model.logit_scale" in params and not bb.clip.model.logit_scale.requires_grad
    assert bb.logit_scale == pytest.approx(float(bb.clip.model.logit_scale.exp()))
    assert bb.embed_dim == 64


@pytest.mark.parametrize("name", TINY)
def test_train_mode_is_ignored(name):
    bb = tiny(name)
    bn = [m for m in bb.clip.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if name == "fedclip-tiny-rn":
        assert bn, "the RN backbone should carry BatchNorm"
    for call in (lambda: bb.clip.train(), lambda: bb.clip.train(True), lambda: bb.clip.eval()):
        assert call() is bb.clip
        assert not bb.clip.training
        assert not any(m.training for m in bb.clip.modules())
        assert not any(m.training for m in bn)


def test_batchnorm_would_move_in_train_mode():
    """Sanity check that the frozen-backbone test below can see BatchNorm statistics move."""
    bb = tiny("fedclip-tiny-rn")
    model = copy.deepcopy(bb.clip.model).train()
    before = model.visual.bn1.running_mean.clone()
    with torch.no_grad():
        model.encode_image(torch.randn(4, 3, 64, 64))
    assert not torch.equal(before, model.visual.bn1.running_mean)


@pytest.mark.parametrize("name", TINY)
def test_training_leaves_backbone_untouched(name, mini):
    bb = tiny(name)
    before = snapshot(bb.clip)
    assert any(k.endswith("running_mean") for k in before) == (name == "fedclip-tiny-rn")
    text = bb.text_features(mini.classes)
    algo = AlgorithmConfig(lr=1e-2, weight_decay=0.0)
    client = AdapterClient("photo", bb, text, algo)
    adapter_before = {k: v.clone() for k, v in client.get_state().items()}
    loader = make_loader(ImageDataset(mini.samples["photo"], bb.preprocess), 4, num_workers=0,
                         shuffle_seed=(0, 0, "photo"))
    bb.clip.train()  # what the reference release does before training: must be a no-op
    client.train()
    result, _ = local_fit(Fabric(accelerator="cpu", devices=1), client, loader, FitPlan(epochs=2))
    assert result.n > 0 and torch.isfinite(torch.tensor(result.loss))

    after = snapshot(bb.clip)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"backbone tensors changed by training: {changed}"
    assert all(p.grad is None for p in bb.clip.parameters())
    assert not bb.clip.training and not any(m.training for m in bb.clip.modules())
    # The adapter did train; its gradients are freed after the turn (they are not client state).
    adapter_after = client.get_state()
    assert any(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_before)
    assert all(p.grad is None for p in client.adapter.parameters())


# -- load_backbone -------------------------------------------------------------------------------

def test_load_backbone_caches_and_seeds():
    cfg = BackboneConfig(name="fedclip-tiny-vit", pretrained=None, download=False)
    a = load_backbone(cfg, seed=7)
    assert load_backbone(cfg, seed=7) is a
    assert load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=None, download=False), seed=7) is a
    weights = {k: v.clone() for k, v in a.clip.state_dict().items()}
    saved = dict(backbone_mod._CACHE)
    try:
        backbone_mod._CACHE.clear()
        b = load_backbone(cfg, seed=7)
        assert b is not a
        assert b.clip.state_dict().keys() == weights.keys()
        assert all(torch.equal(weights[k], v) for k, v in b.clip.state_dict().items())
        other = load_backbone(cfg, seed=8)
        assert not all(torch.equal(weights[k], v) for k, v in other.clip.state_dict().items())
    finally:
        backbone_mod._CACHE.clear()
        backbone_mod._CACHE.update(saved)


def test_text_features_are_normalised_prompts(mini):
    bb = tiny()
    t = bb.text_features(mini.classes)
    assert t.shape == (len(mini.classes), bb.embed_dim) and t.dtype == torch.float32
    torch.testing.assert_close(t, prompt_features(bb, mini.classes))


# -- clients share the backbone ------------------------------------------------------------------

def test_clients_share_backbone_by_reference():
    bb = tiny()
    text = bb.text_features(["dog", "cat"])
    a = AdapterClient("a", bb, text, AlgorithmConfig())
    b = AdapterClient("b", bb, text, AlgorithmConfig())
    assert a.backbone is b.backbone is bb
    assert a.text_features is b.text_features
    for m in (a, b):
        assert set(m.state_dict()) == ADAPTER_KEYS
        ids = [id(p) for p in m.parameters()]
        assert ids == [id(p) for p in m.adapter.parameters()] and len(ids) == 4
        assert set(m.get_state()) == {k.removeprefix("adapter.") for k in ADAPTER_KEYS}
    assert a.adapter is not b.adapter
    # Moving a client to eval/train does not go through the backbone (not a submodule).
    a.train()
    assert not bb.clip.training


# -- losses --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loss_setup(mini):
    bb = tiny()
    samples = [s for d in mini.domains for s in mini.samples[d]]
    by_label: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    # Two images of each of three classes plus one more: repeated labels on purpose.
    labels = sorted(by_label)[:3]
    idx = [i for lab in labels for i in by_label[lab][:2]] + [by_label[sorted(by_label)[3]][0]]
    x, y = real_batch(mini, bb, idx)
    assert len(set(y.tolist())) < len(y)
    return bb, x, y, prompt_features(bb, mini.classes)


def test_contrastive_loss_matches_method(loss_setup):
    bb, x, y, text = loss_setup
    torch.manual_seed(3)
    client = AdapterClient("c", bb, text, AlgorithmConfig(loss="contrastive"))
    out = client.training_step((x, y), 0)
    with torch.no_grad():
        raw = bb.clip.model.encode_image(x).float()
        i_star = adapter_by_hand(client.adapter, raw)
        s = bb.clip.model.logit_scale.exp().float()
        logits = s * i_star @ text[y].T
        targets = torch.arange(len(y))
        expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        prototype = F.cross_entropy(s * i_star @ text.T, y)
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, prototype)  # the two losses are distinguishable here
    assert out["loss"].requires_grad
    assert int(out["correct"]) == int(((i_star @ text.T).argmax(-1) == y).sum())


def test_prototype_loss_matches_method(loss_setup):
    bb, x, y, text = loss_setup
    torch.manual_seed(3)
    client = AdapterClient("c", bb, text, AlgorithmConfig(loss="prototype"))
    out = client.training_step((x, y), 0)
    with torch.no_grad():
        i_star = adapter_by_hand(client.adapter, bb.clip.model.encode_image(x).float())
        s = bb.clip.model.logit_scale.exp().float()
        expected = F.cross_entropy(s * i_star @ text.T, y)
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["contrastive", "prototype"])
def test_batch_of_one_is_skipped(loss_setup, loss):
    bb, x, y, text = loss_setup
    client = AdapterClient("c", bb, text, AlgorithmConfig(loss=loss))
    assert client.training_step((x[:1], y[:1]), 0) is None


def test_forward_on_features_equals_forward_on_images(loss_setup):
    bb, x, y, text = loss_setup
    client = AdapterClient("c", bb, text, AlgorithmConfig())
    with torch.no_grad():
        feats = bb.image_features(x)
        assert feats.shape == (len(y), bb.embed_dim) and feats.dtype == torch.float32
        from_images, from_feats = client(x), client(feats)
        assert from_images.shape == (len(y), text.shape[0])
        assert torch.equal(from_images, from_feats)
        expected = bb.logit_scale * adapter_by_hand(client.adapter, feats) @ text.T
    torch.testing.assert_close(from_feats, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["contrastive", "prototype"])
def test_training_step_gradients_equal_plain_autograd(loss_setup, loss):
    """training_step runs the adapter and the loss as autograd Functions with their gradients written
    out: the same loss and the same gradients (to float rounding) as plain differentiable ops, on
    images and on cached features; a batch of one image is skipped."""
    from fedclip_lightning.model.losses import clip_loss

    bb, x, y, text = loss_setup
    torch.manual_seed(5)
    client = AdapterClient("c", bb, text, AlgorithmConfig(loss=loss))
    with torch.no_grad():  # a trained-looking adapter, not the near-uniform initial attention
        for prm in client.adapter.parameters():
            prm.add_(torch.randn_like(prm) * 0.5)
    plain = clip_loss(loss, bb.logit_scale, client.adapter.forward_autograd(bb.image_features(x)), text, y, plain=True)
    expected = torch.autograd.grad(plain, list(client.adapter.parameters()))
    for inputs in (x, bb.image_features(x)):
        out = client.training_step((inputs, y), 0)
        got = torch.autograd.grad(out["loss"], list(client.adapter.parameters()))
        torch.testing.assert_close(out["loss"].detach(), plain.detach(), rtol=1e-6, atol=1e-6)
        for (name, _), g, want in zip(client.adapter.named_parameters(), got, expected):
            assert want.abs().max() > 0, name
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-7, msg=name)
    assert client.training_step((x[:1], y[:1]), 0) is None  # the reference skips batches of one


# -- errors --------------------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(name="ViT-B-99", pretrained=None, download=False))
    msg = str(info.value)
    assert "'ViT-B-99'" in msg and "backbone.name" in msg
    assert "Did you mean" in msg and "ViT-B-32" in msg


def test_unknown_tag_that_is_not_a_file(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=str(missing), download=False))
    msg = str(info.value)
    assert "backbone.pretrained" in msg and str(missing) in msg and "backbone.pretrained=null" in msg
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(name="ViT-B-32", pretrained="no_such_tag", download=False))
    msg = str(info.value)
    assert "backbone.pretrained='no_such_tag'" in msg and "'openai'" in msg  # lists the real tags


@pytest.fixture
def no_real_caches(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return home


def test_known_tag_without_weights_offline(tmp_path, no_real_caches):
    cache = tmp_path / "cache"
    cache.mkdir()
    cfg = BackboneConfig(name="ViT-B-32", pretrained="openai", cache_dir=str(cache), download=False)
    with pytest.raises(BackboneError) as info:
        load_backbone(cfg)
    msg = str(info.value)
    assert "'ViT-B-32'" in msg and "'openai'" in msg
    assert str(cache / "ViT-B-32.pt") in msg  # open_clip's URL cache in backbone.cache_dir
    assert str(no_real_caches / ".cache" / "clip") in msg  # ~/.cache/clip
    assert "Hugging Face cache" in msg
    assert "backbone.pretrained=/path" in msg and "backbone.download=false" in msg
    assert not any(k[0] == "ViT-B-32" and k[1] == "openai" for k in backbone_mod._CACHE)


def test_slash_model_name_with_known_tag(tmp_path, no_real_caches):
    """ViT-B/32 is open_clip's ViT-B-32: its tags are looked up, not refused."""
    cfg = BackboneConfig(name="ViT-B/32", pretrained="openai", cache_dir=str(tmp_path), download=False)
    with pytest.raises(BackboneError) as info:
        load_backbone(cfg)
    msg = str(info.value)
    assert "neither a pretrained tag" not in msg
    assert "Hugging Face cache" in msg


def test_local_checkpoint_file(tmp_path):
    source = tiny("fedclip-tiny-vit", seed=1)
    path = tmp_path / "w.pt"
    torch.save(source.clip.model.state_dict(), path)
    random_seed5 = tiny("fedclip-tiny-vit", seed=5)
    loaded = load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=str(path), download=False), seed=5)
    assert loaded.weights_file == str(path)
    assert isinstance(loaded.clip, FrozenCLIP) and not any(p.requires_grad for p in loaded.clip.parameters())
    want, got = source.clip.model.state_dict(), loaded.clip.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not all(torch.equal(random_seed5.clip.model.state_dict()[k], got[k]) for k in want)


def test_corrupt_checkpoint_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"this is not a checkpoint \x00\x01\x02" * 20)
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=str(path), download=False))
    msg = str(info.value)
    assert str(path) in msg and "backbone.name='fedclip-tiny-vit'" in msg


def test_mismatched_checkpoint_file(tmp_path):
    """A valid checkpoint of another architecture is a BackboneError too."""
    path = tmp_path / "rn.pt"
    torch.save(tiny("fedclip-tiny-rn").clip.model.state_dict(), path)
    with pytest.raises(BackboneError) as info:
        load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=str(path), download=False))
    assert str(path) in str(info.value)


def test_openai_torchscript_checkpoint_loads(tmp_path):
    """OpenAI's own .pt files are TorchScript archives (what clip.load downloads): they load too."""
    import warnings

    source = tiny("fedclip-tiny-vit", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(source.clip.model, {"encode_image": torch.randn(1, 3, 32, 32)},
                                        check_trace=False)
    path = tmp_path / "openai-style.pt"
    traced.save(str(path))
    loaded = load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=str(path), download=False), seed=9)
    want, got = source.clip.model.state_dict(), loaded.clip.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
