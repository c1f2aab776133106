"""Rounds at the speed of their arithmetic: what 200 FedCLIP rounds cost next to one encoder pass.

Prints, side by side in one run:

1. one bare encoder pass over the task's images (the same ``encode_images`` a
   run uses, image files already in the page cache; the faster of two passes);
2. a cold-cache FedCLIP run of R rounds (fills the feature cache): its encoder
   phase and its rounds;
3. the warm-cache rerun: R rounds with the default checkpoint interval, as a
   multiple of the bare pass (target: <= 0.25x), and where a round's time goes
   (fit, aggregate, evaluate, checkpoint, logging; ms per round);
4. ``--full``: a cold R-round run on all of PACS against its own encoder
   phase (target: <= 1.05x; about 8 minutes here).

Default: ViT-B-32 at random init (no weights can be downloaded here; a random
init costs the same), fp32 on the CPU, the 42-image-per-domain PACS subset
(168 images), art_painting unseen, R = 200.

    python benchmarks/rounds.py
    python benchmarks/rounds.py --full
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from feature_cache import run_cli  # the same subprocess runner (benchmarks/ is on sys.path as the script's folder)

REPO = Path(__file__).resolve().parents[1]
PACS = REPO.parent / "shared" / "data" / "PACS"
PHASES = ("fit", "aggregate", "evaluate", "checkpoint", "logging")


def overrides(args, out: Path, name: str, per_domain: int | None, *more: str) -> list[str]:
    o = ["data=pacs", f"data.root={args.root}", f"data.unseen=[{args.unseen}]", f"backbone.name={args.backbone}",
         "backbone.pretrained=null", "backbone.download=false", "fabric=cpu", "logger=none", "progress=false",
         f"output_dir={out}", f"run_name={name}", f"federation.rounds={args.rounds}", "data.check_images=false"]
    if per_domain:
        o.append(f"data.max_per_domain={per_domain}")
    return o + list(more)


def bare_pass(args, out: Path, per_domain: int | None) -> tuple[float, int]:
    from fedclip_lightning.configure import load_config
    from fedclip_lightning.data.pipeline import build_task
    from fedclip_lightning.model.backbone import load_backbone
    from fedclip_lightning.model.features import encode_images

    cfg = load_config(overrides(args, out, "bare", per_domain))
    task, _ = build_task(cfg)
    samples = [s for c in task.clients for s in (c.train + c.val + c.test)]
    samples += [s for v in task.unseen.values() for s in v]
    backbone = load_backbone(cfg.backbone, device="cpu", seed=cfg.seed)
    workers = cfg.features.num_workers if cfg.features.num_workers is not None else min(8, os.cpu_count() or 1)
    for s in samples:  # every image file in the page cache first: no pass pays for the disk
        Path(s.path).read_bytes()
    encode_images(backbone, samples[:16], batch_size=16, num_workers=0, progress=False)  # warm-up
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        encode_images(backbone, samples, batch_size=cfg.features.batch_size, num_workers=workers, progress=False)
        best = min(best, time.perf_counter() - t0)
    return best, len(samples)


def rounds_seconds(s: dict) -> float:
    """The rounds' own time: every round's fit, aggregation, evaluation, logging and checkpoint."""
    return s["round_seconds_total"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(PACS))
    ap.add_argument("--unseen", default="art_painting")
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--per-domain", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--full", action="store_true", help="also the cold run on all of PACS (minutes)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fedclip-rounds-"))
    env = dict(os.environ, FEDCLIP_CACHE_DIR=str(tmp / "cache"), WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("FEDCLIP_RUN_DIR", None)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.backbone} random init, fp32, PACS {args.per_domain} per domain, unseen {args.unseen}, "
          f"R={args.rounds}")
    t_pass, n_img = bare_pass(args, tmp / "out", args.per_domain)
    cold = run_cli(overrides(args, tmp / "out", "cold", args.per_domain), env)
    warm = run_cli(overrides(args, tmp / "out", "warm", args.per_domain), env)
    assert warm["features"]["encoded_images"] == 0, "the warm run encoded images"
    rw = rounds_seconds(warm)
    rows = [
        (f"bare encoder pass, {n_img} images", f"{t_pass:.2f} s", f"{n_img / t_pass:.1f} img/s", "1.00x"),
        ("cold run: its encoder phase", f"{cold['features']['encode_seconds_max_rank']:.2f} s", "", ""),
        (f"cold run: {args.rounds} rounds", f"{rounds_seconds(cold):.2f} s", "",
         f"{rounds_seconds(cold) / t_pass:.2f}x the pass"),
        (f"warm run: {args.rounds} rounds (default checkpoint settings)", f"{rw:.2f} s",
         f"{1e3 * rw / args.rounds:.1f} ms/round", f"**{rw / t_pass:.2f}x** the pass (target <= 0.25x)"),
    ]
    for ph in PHASES:
        v = warm["phase_seconds"].get(ph, 0.0)
        rows.append((f"  {ph}", f"{v:.2f} s", f"{1e3 * v / args.rounds:.2f} ms/round", f"{v / rw:.0%} of the rounds"))
    if args.full:
        full = run_cli(overrides(args, tmp / "out", "full", None), dict(env, FEDCLIP_CACHE_DIR=str(tmp / "cache-full")))
        enc = full["features"]["encode_seconds_max_rank"]
        rows += [
            (f"[all PACS] cold run's encoder phase, {full['features']['encoded_images']} images", f"{enc:.1f} s",
             f"{full['features']['encoded_images'] / enc:.1f} img/s", "1.00x"),
            (f"[all PACS] cold run, {args.rounds} rounds, whole", f"{full['wall_time_s']:.1f} s", "",
             f"**{full['wall_time_s'] / enc:.3f}x** its own pass (target <= 1.05x)"),
            ("[all PACS]   of which rounds", f"{rounds_seconds(full):.1f} s",
             f"{1e3 * rounds_seconds(full) / args.rounds:.0f} ms/round",
             ", ".join(f"{k} {v:.1f} s" for k, v in full["phase_seconds"].items())),
        ]
    w = max(len(r[0]) for r in rows)
    print()
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>9}  {r[2]:>16}  {r[3]}")
    same = cold["final"] == warm["final"]
    print(f"\ncold and warm runs give the same results: {same}")


if __name__ == "__main__":
    main()
