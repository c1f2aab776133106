"""The other parameter-efficient methods: PromptFL (CoOp), CLIP-Adapter, a linear probe, and the size
ablation of FedCLIP's adapter; their constructions, counts and resume (two processes against one: their golden
cases, tests/test_golden.py)."""

from __future__ import annotations

import csv
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fedclip_lightning.config import BackboneConfig
from fedclip_lightning.model.adapter import AdapterFunction, AttentionAdapter
from fedclip_lightning.model.backbone import load_backbone
from fedclip_lightning.model.heads import (ConditionalPromptLearner, LinearProbe, PromptGenerator, PromptLearner,
                                          ResidualMLPAdapter)
from helpers import PACS_MINI_ARGS, num_adapter_params, read_summary, run_main

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneConfig(name="fedclip-tiny-vit", pretrained=None, download=False), seed=0)


def test_prompt_sequence_is_coops_construction(tiny):
    torch.manual_seed(0)
    model, tok = tiny.clip.model, tiny.tokenizer
    learner = PromptLearner(model, tok, CLASSES, n_ctx=4)
    emb = learner.prompts()
    assert learner.ctx.shape == (4, model.token_embedding.weight.shape[1])
    assert learner.ctx.std().item() == pytest.approx(0.02, rel=0.3)  # CoOp's random init
    tokens = tok([f"X X X X {c}." for c in CLASSES])
    with torch.no_grad():
        ref = model.token_embedding(tokens)
    for i, c in enumerate(CLASSES):
        n_name = len(tok([c])[0].nonzero()) - 2
        eot = int(tokens[i].argmax())
        assert eot == 1 + 4 + n_name + 1  # SOS, the context, the class name, '.', then EOS
        assert torch.equal(emb[i, 0], ref[i, 0])  # SOS
        assert torch.equal(emb[i, 1:5], learner.ctx)  # the context, in positions 1..n_ctx
        assert torch.equal(emb[i, 5:], ref[i, 5:])  # the class tokens, '.', EOS and padding after it
        assert learner.tokens[i].argmax() == eot


def test_class_specific_context_is_coops_csc(tiny):
    """CoOp's CSC: a context of its own for each class (C x n_ctx x width parameters, all of them what
    travels), each class's prompt built from its own, and a class's features moved by its context alone."""
    torch.manual_seed(0)
    model, tok = tiny.clip.model, tiny.tokenizer
    learner = PromptLearner(model, tok, CLASSES, n_ctx=4, csc=True)
    width = model.token_embedding.weight.shape[1]
    assert learner.ctx.shape == (len(CLASSES), 4, width)
    assert [k for k, _ in learner.named_parameters()] == ["ctx"] and list(learner.state_dict()) == ["ctx"]
    assert learner.ctx.std().item() == pytest.approx(0.02, rel=0.3)
    assert not torch.equal(learner.ctx[0], learner.ctx[1])  # each class drew its own
    emb = learner.prompts()
    for i in range(len(CLASSES)):
        assert torch.equal(emb[i, 1:5], learner.ctx[i])
    with torch.no_grad():
        before = learner.class_features(None).clone()
        learner.ctx[2] += 0.5
        after = learner.class_features(None)
    moved = [(after[i] - before[i]).abs().max().item() > 0 for i in range(len(CLASSES))]
    assert moved == [i == 2 for i in range(len(CLASSES))]
    # from a phrase, every class's context starts as the phrase: untrained, zero-shot CLIP's features
    phrase = PromptLearner(model, tok, CLASSES, init="a picture of a", csc=True)
    assert phrase.ctx.shape == (len(CLASSES), 4, width)
    with torch.no_grad():
        torch.testing.assert_close(phrase.class_features(None), tiny.text_features(CLASSES, "a picture of a {}."),
                                   atol=1e-6, rtol=0)


def test_prompt_generator_is_fedtpgs(tiny):
    """FedTPG's generator: learned queries attend to the class names' text features, an MLP makes the context;
    its parameters (what travels) hold nothing per class, so a state trained on some classes prompts others,
    with a context generated from their names."""
    model, tok = tiny.clip.model, tiny.tokenizer
    width, e, h = model.token_embedding.weight.shape[1], tiny.embed_dim, 16
    torch.manual_seed(0)
    gen = PromptGenerator(model, tok, CLASSES, tiny.text_features(CLASSES), n_ctx=4, hidden=h)
    shapes = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    assert shapes == {"query": (4, h), "key.weight": (h, e), "value.weight": (h, e), "mlp.0.weight": (h, h),
                      "mlp.0.bias": (h,), "mlp.2.weight": (width, h), "mlp.2.bias": (width,)}
    assert sum(p.numel() for p in gen.parameters()) == 4 * h + 2 * e * h + h * h + h + h * width + width
    # the context is the cross-attention of the queries over the names, through the MLP
    k, v = gen.names @ gen.key.weight.T, gen.names @ gen.value.weight.T
    want = gen.mlp(torch.softmax(gen.query @ k.T / h ** 0.5, dim=-1) @ v)
    torch.testing.assert_close(gen.ctx, want)
    emb = gen.prompts()
    assert all(torch.equal(emb[i, 1:5], gen.ctx) for i in range(len(CLASSES)))  # shared by the task's classes
    gen.class_features(None).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    # other classes: the same state, another context (from their names), their own class features
    novel = ["horse", "house", "person"]
    other = PromptGenerator(model, tok, novel, tiny.text_features(novel), n_ctx=4, hidden=h)
    other.load_state_dict(gen.state_dict())
    assert not torch.allclose(other.ctx, gen.ctx)
    with torch.no_grad():
        assert other.class_features(None).shape == (3, e)


def test_conditional_prompt_is_cocoops(tiny):
    """CoCoOp: the meta-net (e -> e/16 -> width, with biases) shifts the shared context by one vector per image;
    image i's class features are exactly those of CoOp's context ``ctx + meta_net(f_i)``, written out here; the
    context and the meta-net are what trains and travels, nothing per class."""
    model, tok = tiny.clip.model, tiny.tokenizer
    width, e = model.token_embedding.weight.shape[1], tiny.embed_dim
    h = e // 16
    torch.manual_seed(0)
    cc = ConditionalPromptLearner(model, tok, CLASSES, e, n_ctx=4)
    shapes = {k: tuple(v.shape) for k, v in cc.state_dict().items()}
    assert shapes == {"ctx": (4, width), "meta_net.linear1.weight": (h, e), "meta_net.linear1.bias": (h,),
                      "meta_net.linear2.weight": (width, h), "meta_net.linear2.bias": (width,)}
    assert sum(p.numel() for p in cc.parameters()) == 4 * width + e * h + h + h * width + width
    feats = F.normalize(torch.randn(3, e), dim=-1)
    with torch.no_grad():
        got = cc.class_features_for(feats)
        assert got.shape == (3, len(CLASSES), e)
        shift = cc.meta_net.linear2(F.relu(cc.meta_net.linear1(feats)))  # pi_i, one vector per image
        for i in range(3):
            coop = PromptLearner(model, tok, CLASSES, n_ctx=4)
            coop.ctx.copy_(cc.ctx + shift[i])  # the same shift in every context position
            torch.testing.assert_close(got[i], coop.class_features(None), atol=2e-6, rtol=0)
        assert not torch.allclose(got[0], got[1])  # each image its own class features
    # the training path (one text-tower call for all prompts) equals evaluation's chunked calls
    cc.PROMPTS_PER_CALL = len(CLASSES)  # one image a call
    with torch.no_grad():
        torch.testing.assert_close(cc.class_features_for(feats), got, atol=2e-6, rtol=0)
    loss = F.cross_entropy(tiny.logit_scale * torch.einsum("bd,bcd->bc", feats, cc.class_features_for(feats)),
                           torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cc.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # other classes: the same state prompts them (nothing per class)
    novel = ["horse", "house", "person"]
    other = ConditionalPromptLearner(model, tok, novel, e, n_ctx=4)
    other.load_state_dict(cc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other.class_features_for(feats), got[:, 4:], atol=2e-6, rtol=0)


def test_cocoop_starts_from_its_phrase_and_a_zero_shift_is_zero_shot(tiny):
    """From CoCoOp's 'a photo of a' with the meta-net's output layer at zero, every image's class features are
    zero-shot CLIP's with that prompt, and a client's logits are zero-shot CLIP's logits."""
    from fedclip_lightning.client import AdapterClient
    from fedclip_lightning.algorithms.cocoop import CoCoOpConfig

    cc = ConditionalPromptLearner(tiny.clip.model, tiny.tokenizer, CLASSES, tiny.embed_dim, init="a photo of a")
    assert cc.n_ctx == 4
    with torch.no_grad():
        cc.meta_net.linear2.weight.zero_()
        cc.meta_net.linear2.bias.zero_()
    zero_shot = tiny.text_features(CLASSES, "a photo of a {}.")
    x = torch.randn(5, tiny.embed_dim)
    client = AdapterClient("c", tiny, zero_shot, CoCoOpConfig(), head=cc)
    with torch.no_grad():
        text = client.class_features_for(F.normalize(x, dim=-1))
        assert text.shape == (5, len(CLASSES), tiny.embed_dim)
        torch.testing.assert_close(text, zero_shot.expand(5, -1, -1), atol=1e-6, rtol=0)
        torch.testing.assert_close(client(x), tiny.logit_scale * F.normalize(x, dim=-1) @ zero_shot.T, atol=1e-5,
                                   rtol=0)
    out = client.training_step((x, torch.arange(5)), 0)
    torch.testing.assert_close(out["loss"], F.cross_entropy(client(x), torch.arange(5)), atol=1e-6, rtol=0)
    assert out["correct"] == (client(x).argmax(dim=-1) == torch.arange(5)).sum()


def test_prompt_from_a_phrase_untrained_gives_the_zero_shot_logits(tiny):
    learner = PromptLearner(tiny.clip.model, tiny.tokenizer, CLASSES, init="a picture of a")
    assert learner.n_ctx == 4
    with torch.no_grad():
        prompt = learner.class_features(None)
    zero_shot = tiny.text_features(CLASSES, "a picture of a {}.")
    torch.testing.assert_close(prompt, zero_shot, atol=1e-6, rtol=0)
    feats = torch.randn(5, tiny.embed_dim)
    torch.testing.assert_close(learner(feats) @ prompt.T, F.normalize(feats, dim=-1) @ zero_shot.T, atol=1e-6,
                               rtol=0)


def test_only_the_context_gets_gradients(tiny):
    learner = PromptLearner(tiny.clip.model, tiny.tokenizer, CLASSES, n_ctx=4)
    feats = F.normalize(torch.randn(6, tiny.embed_dim), dim=-1)
    loss = F.cross_entropy(tiny.logit_scale * feats @ learner.class_features(None).T, torch.arange(6))
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny.clip.model.parameters())
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]  # all that trains and travels


def test_clip_adapter_with_alpha_zero_is_zero_shot_and_the_probe_starts_there(tiny):
    x = torch.randn(5, tiny.embed_dim)
    text = tiny.text_features(CLASSES)
    assert torch.equal(ResidualMLPAdapter(tiny.embed_dim, 4, alpha=0.0)(x), F.normalize(x, dim=-1))
    probe = LinearProbe(text)
    assert torch.equal(probe(x) @ probe.class_features(text).T, F.normalize(x, dim=-1) @ text.T)


def test_parameter_counts_for_vit_b_32():
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    d, width = 512, model.token_embedding.weight.shape[1]
    counts = {
        "fedclip": sum(p.numel() for p in AttentionAdapter(d).parameters()),
        "promptfl": sum(p.numel() for p in PromptLearner(model, open_clip.get_tokenizer("ViT-B-32"), CLASSES,
                                                         n_ctx=16).parameters()),
        "clip_adapter": sum(p.numel() for p in ResidualMLPAdapter(d, 4).parameters()),
        "linear_probe": sum(p.numel() for p in LinearProbe(torch.zeros(7, d)).parameters()),
        "cocoop": sum(p.numel() for p in ConditionalPromptLearner(model, open_clip.get_tokenizer("ViT-B-32"), CLASSES,
                                                                  d, init="a photo of a").parameters()),
    }
    assert counts == {"fedclip": 525_312, "promptfl": 8_192, "clip_adapter": 131_072, "linear_probe": 3_584,
                      "cocoop": 35_360}
    assert width == 512
    sizes = {h: num_adapter_params(d, h) for h in (512, 256, 128, 64, 32)}
    assert sizes == {512: 525_312, 256: 262_912, 128: 131_712, 64: 66_112, 32: 33_312}
    assert all(sum(p.numel() for p in AttentionAdapter(d, h).parameters()) == n for h, n in sizes.items())


def test_bottleneck_adapter_gradients_match_autograd():
    torch.manual_seed(0)
    a = AttentionAdapter(12, hidden=5).double()
    x = torch.randn(7, 12, dtype=torch.double, requires_grad=True)
    params = (a.fc1.weight, a.fc1.bias, a.fc2.weight, a.fc2.bias)
    assert torch.autograd.gradcheck(lambda *t: AdapterFunction.apply(*t), (x, *params))
    a, x = a.float(), x.detach().float()  # the module computes in fp32
    assert torch.equal(a(x), a.forward_autograd(x))


# -- end to end --------------------------------------------------------------------------------------

NEW = ["promptfl", "promptfl_csc", "fedtpg", "cocoop", "clip_adapter", "linear_probe", "fedclip_small"]
EXTRA = {"promptfl": ["algorithm=promptfl", "algorithm.n_ctx=4"], "fedtpg": ["algorithm=fedtpg", "algorithm.hidden=16"],
         "cocoop": ["algorithm=cocoop"],
         "promptfl_csc": ["algorithm=promptfl", "algorithm.n_ctx=4", "algorithm.csc=true"],
         "clip_adapter": ["algorithm=clip_adapter"],
         "linear_probe": ["algorithm=linear_probe"], "fedclip_small": ["algorithm.adapter_hidden=8"]}
BASE = [*PACS_MINI_ARGS, "logger=none", "federation.rounds=4", "federation.checkpoint_min_seconds=0",
        "federation.keep_checkpoints=4", "algorithm.local_epochs=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = {}
    for name in NEW:
        tmp = tmp_path_factory.mktemp(name)
        proc = run_main([*BASE, *EXTRA[name], "run_name=r"], tmp)
        assert proc.returncode == 0, proc.stderr
        out[name] = tmp / "outputs" / "r"
    return out


@pytest.mark.parametrize("name", NEW)
def test_resume_from_round_2_is_bitwise_the_straight_run(straight, tmp_path, name):
    ref = straight[name]
    run = tmp_path / "outputs" / "r"
    run.mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "round-000002", run / "checkpoints" / "round-000002")
    shutil.copy(ref / "data_manifest.json", run / "data_manifest.json")
    with open(ref / "metrics.csv") as f:
        kept = [row for row in csv.reader(f) if row[0] in ("round", "1", "2")]
    with open(run / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerows(kept)
    proc = run_main([*BASE, *EXTRA[name], "run_name=r", "resume=auto"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_summary(run)["resumed_from"] == 2
    assert (run / "metrics.csv").read_text() == (ref / "metrics.csv").read_text()
    a = torch.load(ref / "adapter_final.pt", weights_only=True)["state"]
    b = torch.load(run / "adapter_final.pt", weights_only=True)["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_promptfl_ft_reports_personal_and_global_context_accuracies(tmp_path):
    proc = run_main([*PACS_MINI_ARGS, "logger=none", "algorithm=promptfl_ft", "algorithm.n_ctx=4",
                    "algorithm.personal_epochs=2", "run_name=p", "plots=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for png in ("accuracy.png", "confusion.png"):  # drawn for a personalising run's splits (val_global, ...)
        assert (tmp_path / "outputs" / "p" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = read_summary(tmp_path / "outputs" / "p")
    assert s["algorithm"] == "promptfl_ft" and s["trainable_params"] == 4 * 32  # n_ctx x the text width
    assert set(s["final"]["client_test_acc_global"]) == set(s["clients"])
    with open(tmp_path / "outputs" / "p" / "metrics.csv") as f:
        splits = {r["split"] for r in csv.DictReader(f)}
    assert {"val_global", "test_global", "val", "test"} <= splits


def test_class_specific_context_trains_and_sends_one_context_per_class(straight):
    s = read_summary(straight["promptfl_csc"])
    assert s["trainable_params"] == 7 * 4 * 32  # classes x n_ctx x the text width
    assert s["bytes_per_client_per_round"] == 4 * s["trainable_params"]
    ctx = torch.load(straight["promptfl_csc"] / "adapter_final.pt", weights_only=True)["state"]["ctx"]
    assert ctx.shape == (7, 4, 32)


@pytest.mark.parametrize("override, message", [
    ("algorithm.csc=true", "CoCoOp shifts one context shared by the classes"),
    ("algorithm.loss=contrastive", "only the cross-entropy over the classes applies"),
])
def test_cocoop_refuses_what_it_cannot_do(tmp_path, override, message):
    proc = run_main([*PACS_MINI_ARGS, "logger=none", "algorithm=cocoop", override], tmp_path)
    assert proc.returncode != 0 and message in proc.stderr and override.split("=")[0] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cocoop_warns_when_a_step_runs_many_prompts(tmp_path):
    proc = run_main([*PACS_MINI_ARGS, "logger=none", "algorithm=cocoop", "federation.rounds=1", "data.batch_size=600",
                     "run_name=w"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "600 x 7 = 4,200 prompts through the text tower" in proc.stdout + proc.stderr
