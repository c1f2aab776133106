"""The project's small CLIP: fedclip-lightning-pretrain and the shipped weights."""

from __future__ import annotations

import pytest
import torch

from fedclip_lightning.configure import load_config
from fedclip_lightning.model.backbone import load_backbone
from fedclip_lightning.pretrain import MIX, WEIGHTS, evaluate_zero_shot, pretrain


def test_pretraining_is_deterministic_and_loads_like_any_checkpoint(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    info = pretrain(a, steps=3, batch=8, per_pair=2, seed=1, eval_per_class=2)
    pretrain(b, steps=3, batch=8, per_pair=2, seed=1, eval_per_class=2)
    assert info["steps"] == 3 and info["images"] == 20  # 2 photos and 2 cartoons of each of 5 shapes
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.read_bytes() == b.read_bytes()  # the same file, byte for byte, whatever its name
    assert all(v.dtype == torch.float16 for v in sa.values() if v.is_floating_point())
    # Through backbone.pretrained=<file>, as real weights load: no special case.
    backbone = load_backbone(load_config(["backbone=mini_clip", f"backbone.pretrained={a}"]).backbone)
    assert backbone.weights_file == str(a)
    torch.testing.assert_close(backbone.clip.model.visual.attnpool.c_proj.weight.half(),
                               sa["visual.attnpool.c_proj.weight"])


def test_shipped_weights_have_the_documented_zero_shot_accuracy():
    """The figures of docs/small-clip.md (and the pretraining script's report) for the file in the package."""
    backbone = load_backbone(load_config([]).backbone)
    assert backbone.weights_file == str(WEIGHTS)
    import open_clip

    model = backbone.clip.model
    acc = evaluate_zero_shot(model, open_clip.get_tokenizer("fedclip-mini"), backbone.preprocess, seed=0)
    assert acc == {"photo": 0.975, "cartoon": 1.0, "painting": 0.2, "sketch": 0.595, "chalk": 0.785, "neon": 0.665}
    assert set(acc) == set(MIX)


@pytest.mark.parametrize("args, says", [
    (["--mix", "photo=x"], "--mix 'photo=x' is not style=weight"),
    (["--mix", "video=1"], "--mix 'video=1' is not style=weight"),
    (["--batch", "1000", "--per-pair", "2"], "at least --batch images"),
    (["--steps", "0"], "--steps >= 1"),
])
def test_bad_arguments_are_refused_with_a_fix(tmp_path, args, says):
    """In this interpreter (tests/test_cli.py runs the module as a command)."""
    from fedclip_lightning.pretrain import main
    from helpers import run_main

    proc = run_main(["--out", str(tmp_path / "x.pt"), *args], tmp_path, main=main)
    assert proc.returncode == 2 and says in proc.stderr and "Fix:" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.pt").exists()


def test_missing_shipped_weights_are_a_message_not_a_traceback(tmp_path, monkeypatch):
    """A package installed without its weights file: the demo's config refuses with the key and the fix."""
    from fedclip_lightning import weights
    from fedclip_lightning.errors import ConfigError

    monkeypatch.setattr(weights, "HERE", tmp_path)
    with pytest.raises(ConfigError, match=r"backbone.pretrained: no shipped weights 'fedclip-mini-synthetic'.*Fix: "
                                          r"reinstall the package"):
        load_config([])
