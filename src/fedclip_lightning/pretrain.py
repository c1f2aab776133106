"""A small CLIP that the project pretrains itself, so that accuracy means something without downloads.

``fedclip-lightning-pretrain`` draws captioned images of the synthetic shapes (``data.synthetic``'s
renderer: five shapes at several sizes, positions and colours, mostly photos and cartoons, a few chalk
drawings and neon signs; captions such as "a cartoon of a star", "a small triangle in a photo" or "a red
cross", each naming the shape and some of its style, size and colour) and trains the open_clip model
``fedclip-mini`` (a small ModifiedResNet image tower, 64 px, and a 2-layer text transformer, 64-d
features) with CLIP's contrastive loss, from a fixed seed, in under two minutes on two CPU cores. A
caption counts as a positive for every image of the batch it describes (soft targets), since five shapes
repeat within any batch. It writes an open_clip checkpoint (a plain state dict, fp16, 5.9 MB, most of it
the text tower's 49,408-token embedding table) that loads through ``backbone.pretrained=<file>`` like any
real weights; the package ships it (``fedclip_lightning/weights/fedclip-mini-synthetic.pt``) and the demo
uses it (``backbone=mini_clip``).

It is a teaching model, not CLIP: it knows five shapes. The demo's clients draw them as sketches (never
seen in pretraining), chalk drawings and neon signs (seen a handful of times), so zero-shot is well above
chance but far from perfect, and an adapter has something to learn; its unseen domain, photos, the model
knows well.

    fedclip-lightning-pretrain                       # rewrites the shipped weights (same seed: same tensors)
    fedclip-lightning-pretrain --out /tmp/mini.pt --steps 300
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import quiet_on_closed_pipe
from .files import atomic_save

MODEL = "fedclip-mini"
WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL}-synthetic.pt"
# The pretraining mix: images per (style, shape) relative to --per-pair. Photos and cartoons are its bulk;
# chalk drawings and neon signs are rare (2 of each shape at --per-pair 300), so the model knows them a
# little; sketches and paintings it never sees. On the demo's clients (sketch, chalk, neon) zero-shot is
# then well above chance but far from perfect, while the features still tell the shapes apart: an adapter
# has something to learn (benchmarks and numbers: docs/small-clip.md).
MIX = {"photo": 1.0, "cartoon": 1.0, "painting": 0.0, "sketch": 0.0, "chalk": 0.007, "neon": 0.007}
# Caption templates over an image's attributes; a template names the shape and any of colour, size
# and style. A caption is a positive for every image whose attributes it matches (soft targets).
TEMPLATES = ("a picture of a {shape}", "a {style} of a {shape}", "a {size}{shape} in a {style}", "a {size}{shape}",
             "a {shape}", "a {color}{shape}")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")


def size_word(radius: float) -> str:
    return "small" if radius < 0.21 else "big" if radius > 0.28 else ""


# Hue bins (upper edges) of the colour names; red wraps around.
_HUES = ((0.04, "red"), (0.11, "orange"), (0.19, "yellow"), (0.45, "green"), (0.53, "cyan"), (0.72, "blue"),
         (0.83, "purple"), (0.93, "pink"), (1.01, "red"))


def color_word(img, cx: float, cy: float, r: float) -> str:
    """The colour name of the shape's fill: the hue of the mean pixel in a disc at the centre of the
    shape ("" when that is grey or dark, as in a sketch)."""
    import colorsys

    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    yy, xx = np.mgrid[:a.shape[0], :a.shape[1]]
    disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= (0.25 * r) ** 2
    h, s, v = colorsys.rgb_to_hsv(*a[disc].mean(0))
    if s < 0.25 or v < 0.2:
        return ""
    return next(name for edge, name in _HUES if h < edge)


def caption(rng: np.random.Generator, attrs: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A caption for an image with these attributes, and the attributes it names (what it matches)."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    named = {k: v for k, v in attrs.items() if "{" + k + "}" in template and (k == "shape" or v)}
    words = {k: (v + " " if k in ("color", "size") and v else v) for k, v in attrs.items()}
    return " ".join(template.format(**words).split()), named


def render(style: str, shape: str, index: int, seed: int, image_size: int = 64):
    """One pretraining image and its attributes (shape, style, size and colour words), drawn like the
    demo's images but seeded apart from them."""
    from PIL import Image

    from .data.partition import stable_seed
    from .data.synthetic import _STYLES, _SUPERSAMPLE

    rng = np.random.default_rng(stable_seed(seed, "pretrain", style, shape, index))
    size = image_size * _SUPERSAMPLE
    rel = rng.uniform(0.15, 0.34)
    r = size * rel
    cx, cy = rng.uniform(r * 1.05, size - r * 1.05, 2)
    img = _STYLES[style](rng, shape, size, (cx, cy, r, rng.uniform(0, 2 * math.pi))).convert("RGB")
    attrs = {"shape": shape, "style": style, "size": size_word(rel), "color": color_word(img, cx, cy, r)}
    return img.resize((image_size, image_size), Image.LANCZOS), attrs


def make_data(preprocess, per_pair: int, seed: int, mix: dict[str, float] = MIX
              ) -> tuple[torch.Tensor, list[dict[str, str]]]:
    from tqdm.auto import tqdm

    from .data.synthetic import SYNTHETIC_CLASSES

    images, meta = [], []
    todo = [(st, sh, i) for st, w in mix.items() for sh in SYNTHETIC_CLASSES for i in range(round(w * per_pair))]
    for st, sh, i in tqdm(todo, desc="drawing", unit="img", leave=False, disable=not sys.stderr.isatty()):
        img, attrs = render(st, sh, i, seed)
        images.append(preprocess(img))
        meta.append(attrs)
    return torch.stack(images), meta


def pretrain(out: Path, steps: int = 1000, batch: int = 64, per_pair: int = 300, seed: int = 0,
             lr: float = 2e-3, mix: dict[str, float] = MIX, eval_per_class: int = 40) -> dict:
    """Train ``fedclip-mini`` contrastively and write its fp16 state dict to ``out``; returns what it
    measured (zero-shot accuracy on ``eval_per_class`` new images per style and shape). Seeded and
    deterministic, on a random stream of its own (the caller's is left as it was)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True)
            return _train(out, steps, batch, per_pair, seed, lr, mix, eval_per_class)
        finally:
            torch.use_deterministic_algorithms(deterministic)


def _train(out: Path, steps: int, batch: int, per_pair: int, seed: int, lr: float, mix: dict[str, float],
           eval_per_class: int) -> dict:
    import open_clip
    from tqdm.auto import tqdm

    from .model.backbone import register_tiny_configs

    register_tiny_configs()
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # "initialized randomly": meant
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    finally:
        logging.getLogger().disabled = was
    tokenizer = open_clip.get_tokenizer(MODEL)
    t0 = time.perf_counter()
    images, meta = make_data(preprocess, per_pair, seed, mix)
    drawn = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretraining", unit="step", disable=not sys.stderr.isatty())
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.from_numpy(rng.choice(len(meta), size=batch, replace=False))
        x = images[idx]
        if rng.random() < 0.5:
            x = x.flip(-1)
        rows = idx.tolist()
        captions = [caption(rng, meta[i]) for i in rows]
        texts = tokenizer([c for c, _ in captions])
        img_f = F.normalize(model.encode_image(x), dim=-1)
        txt_f = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * img_f @ txt_f.T
        # Caption i is a positive for every image of the batch that has the attributes it names.
        match = torch.tensor([[all(meta[j].get(k) == v for k, v in named.items()) for j in rows]
                              for _, named in captions], dtype=torch.float32)  # [caption, image]
        # logits[image, caption]: an image's target is the captions that describe it, a caption's the images
        # it describes (each row's own pair always matches).
        loss = (F.cross_entropy(logits, match.T / match.T.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, match / match.sum(1, keepdim=True))) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    zero_shot = evaluate_zero_shot(model, tokenizer, preprocess, seed, eval_per_class)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_save(state, out)  # a unique temporary name, and the same bytes for the same tensors
    return {"steps": steps, "images": len(meta), "draw_seconds": round(drawn, 1),
            "train_seconds": round(time.perf_counter() - t0 - drawn, 1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4), "bytes": out.stat().st_size,
            "zero_shot": zero_shot}


@torch.no_grad()
def evaluate_zero_shot(model, tokenizer, preprocess, seed: int, per_class: int = 40) -> dict[str, float]:
    """Zero-shot accuracy ("a picture of a {shape}") on new images of every style of the demo, the two
    pretraining styles and the two it never saw."""
    from .data.synthetic import SYNTHETIC_CLASSES

    text = F.normalize(model.encode_text(tokenizer([f"a picture of a {c}" for c in SYNTHETIC_CLASSES])), dim=-1)
    out = {}
    for style in MIX:
        x = torch.stack([preprocess(render(style, c, 10_000 + i, seed)[0]) for c in SYNTHETIC_CLASSES
                         for i in range(per_class)])
        y = torch.arange(len(SYNTHETIC_CLASSES)).repeat_interleave(per_class)
        pred = (F.normalize(model.encode_image(x), dim=-1) @ text.T).argmax(-1)
        out[style] = round((pred == y).float().mean().item(), 3)
    return out


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedclip-lightning-pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS, help=f"checkpoint to write (default: {WEIGHTS})")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--per-pair", type=int, default=300, help="images per (style, shape)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", default=",".join(f"{k}={v:g}" for k, v in MIX.items()),
                    help="images per (style, shape) relative to --per-pair, e.g. photo=1,cartoon=1,painting=0.1")
    args = ap.parse_args(argv)
    try:
        mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}
        if not set(mix) <= set(MIX) or any(v < 0 for v in mix.values()):
            raise ValueError(args.mix)
    except ValueError:
        print(f"fedclip-lightning-pretrain: --mix {args.mix!r} is not style=weight,... over {list(MIX)} "
              "with weights >= 0. Fix: e.g. --mix photo=1,cartoon=1,painting=0.1", file=sys.stderr)
        return 2
    images = sum(round(w * args.per_pair) for w in mix.values()) * 5
    if args.steps < 1 or args.batch < 2 or images < args.batch:
        print(f"fedclip-lightning-pretrain: --steps {args.steps} --batch {args.batch} --per-pair {args.per_pair} "
              f"(with --mix {args.mix}: {images} images): need --steps >= 1, --batch >= 2 and at least --batch "
              "images. Fix: e.g. --steps 1000 --batch 64 --per-pair 300.", file=sys.stderr)
        return 2
    info = pretrain(args.out, args.steps, args.batch, args.per_pair, args.seed, mix=mix)
    print(f"wrote {args.out}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
