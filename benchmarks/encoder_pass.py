"""The encoder pass, stage by stage: what a cold FedCLIP run waits for, and which stage holds it back.

Prints, for one image set and backbone, in one run, side by side:

1. decode + preprocess alone (images/s): the loader of the pass (``encode_images``'s own DataLoader, its
   workers and decoder) consumed without the encoder, for each worker count;
2. the encoder alone on preprocessed tensors already in memory, for each precision (fp32, bf16; fp16 on a
   GPU), with a first call (kernel set-up) timed apart;
3. the whole pass (``fedclip_lightning.model.features.encode_images``, as the feature cache runs it) for
   each precision, and its ratio to its slowest stage (target: >= 0.9) and to the shared-core bound
   ``1 / (1/encoder + 1/decode)`` (each stage alone had every core; where no core is spare, as on 2
   cores, the pass can at best add their times per image);
4. for each reduced precision, the features against fp32's: the lowest cosine similarity and the largest
   absolute difference (of L2-normalised features);
5. the hardware's limit: which matrix units the CPU has (AMX, AVX512-BF16), the rate of a bare matrix
   product of the encoder's own shapes (its MLP at one call's tokens) for each precision, and the
   encoder's rate in the same units (its FLOPs per image, counted by torch's FlopCounterMode on the
   path it runs, times its images/s) as a share of it; and the class-token path against the tower's
   own forward, timed in alternation. A change of precision can give the encoder at most the ratio of the
   bare products: 2.1-2.4x on a Zen 4 EPYC, about 4x on another 2-core machine;
6. accuracy against fp32 on the same run: the embedded demo (the project's pretrained small CLIP,
   FedCLIP, 200 rounds) with backbone.precision=fp32 and =bf16, zero-shot and FedCLIP accuracies side
   by side (``--accuracy``; the only place here where the weights mean something).

Default: ViT-B-32 at random init (no weights can be downloaded here; a random init costs the same), a
seeded subset of PACS (250 images per domain), batches of 256 (features.batch_size) in encoder calls of
the pass's own size (features.encoder_batch_size=auto: 16 images for ViT-B/32 on a CPU), on the CPU (and
the GPU where there is one). First, as the baseline of the ratios, the fp32 pass as issue 15 measured it.

    python benchmarks/encoder_pass.py                         # the figures of benchmarks/README.md
    python benchmarks/encoder_pass.py --per-domain 0          # all 9,991 PACS images (minutes per row)
    python benchmarks/encoder_pass.py --precisions fp32,bf16 --workers 0,1,2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PACS = REPO.parent / "shared" / "data" / "PACS"


def samples_of(root: Path, per_domain: int) -> list:
    from fedclip_lightning.data.domains import scan_domains
    from fedclip_lightning.data.pipeline import subsample

    ds = scan_domains(root, None, on_corrupt="error", check_images=False)
    if per_domain:
        ds = subsample(ds, per_domain, seed=0)
    return [s for items in ds.samples.values() for s in items]


def backbone_for(args, precision: str, device: str):
    from fedclip_lightning.config import BackboneConfig
    from fedclip_lightning.model.backbone import load_backbone

    cfg = BackboneConfig(name=args.backbone, pretrained=None, precision=precision, download=False)
    return load_backbone(cfg, device=device, seed=0)


def decode_rate(backbone, samples, args, workers: int, split: bool) -> float:
    """Images/s of the pass's loader alone (decode, preprocess, collate; pinned on a GPU). ``split``: the
    pass's own way (uint8 pixels from the workers, each encoder call's images normalised on the device
    just before the call, in the precision's input dtype); otherwise the whole transform per image in the
    workers (fp32 tensors)."""
    from fedclip_lightning.model.backbone import input_dtype
    from fedclip_lightning.model.features import PixelsToBatch, encoder_calls, encoder_chunk, image_loader

    pixels = PixelsToBatch(backbone.preprocess) if split else None
    loader = image_loader(backbone, samples, batch_size=args.batch, num_workers=workers, pixels=pixels)
    chunk = encoder_chunk(backbone, args.encoder_batch)
    dtype = input_dtype(backbone.clip.model.visual)
    t = time.perf_counter()
    n = 0
    for x, _ in loader:
        if pixels is not None:
            x = x.to(backbone.device, non_blocking=True)
            for part in encoder_calls(x, chunk):
                pixels.finish(part).to(dtype)
        n += len(x)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def encoder_rate(backbone, batches: list[torch.Tensor], chunk: int | None) -> tuple[float, float, torch.Tensor]:
    """(images/s, seconds of a first call made before the timing (kernel set-up), the features) of the
    encoder alone, in calls of ``chunk`` images as the pass makes them."""
    from fedclip_lightning.model.features import encode_batch

    device = backbone.device
    with torch.inference_mode():
        t = time.perf_counter()
        encode_batch(backbone, batches[0][: chunk or len(batches[0])].to(device), chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t
        t = time.perf_counter()
        feats = [encode_batch(backbone, x.to(device), chunk).float().cpu() for x in batches]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rest = time.perf_counter() - t
    return sum(len(x) for x in batches) / rest, first, torch.cat(feats)


def class_token_gain(backbone, batches: list[torch.Tensor], chunk: int | None, rounds: int = 8, images: int = 128
                     ) -> tuple[float, float, float, int]:
    """The class-token-only last block against the tower's own forward on the first ``images`` images:
    the two timed back to back ``rounds`` times, in alternating order, so the machine's drift (10-15%
    over minutes here, more than the difference) falls on both. Returns the medians of (images/s with
    the class-token path, images/s with the own forward, their ratio per round) and the image count."""
    import statistics

    from fedclip_lightning.model.features import encode_batch

    x = torch.cat(batches)[:images].to(backbone.device)
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        with torch.inference_mode():
            encode_batch(backbone, x[: chunk or len(x)], chunk)
            for r in range(rounds):
                for class_token in ((False, True) if r % 2 else (True, False)):
                    backbone.clip.class_token_only = class_token
                    t = time.perf_counter()
                    encode_batch(backbone, x, chunk).float().cpu()
                    rates[class_token].append(len(x) / (time.perf_counter() - t))
    finally:
        backbone.clip.class_token_only = True
    ratio = statistics.median(a / b for a, b in zip(rates[True], rates[False]))
    return statistics.median(rates[True]), statistics.median(rates[False]), ratio, len(x)


def pass_rate(backbone, samples, args, workers: int) -> float:
    from fedclip_lightning.model.features import encode_images

    t = time.perf_counter()
    encode_images(backbone, samples, batch_size=args.batch, num_workers=workers, progress=False,
                  encoder_batch_size=args.encoder_batch)
    return len(samples) / (time.perf_counter() - t)


def issue_pass_rate(backbone, samples, workers: int) -> float:
    """The fp32 pass as issue 15 measured it (620.7 s, 16.1 img/s on all of PACS; the code of commit
    405d482): batches of 256 (features.batch_size), the whole transform per image in the workers (fp32
    tensors), the whole batch in one encoder call. Today's pass, side by side, is what it is compared to."""
    from fedclip_lightning.model.features import image_loader

    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in image_loader(backbone, samples, batch_size=256, num_workers=workers):
            backbone.image_features(x).float().cpu()
    return len(samples) / (time.perf_counter() - t)


def matrix_units() -> str:
    """The CPU's bf16 matrix instructions, as /proc/cpuinfo lists them."""
    from fedclip_lightning.model.backbone import cpu_flags

    flags = cpu_flags()
    if not flags:
        return "unknown (no /proc/cpuinfo flags)"
    if "amx_bf16" in flags:
        return "AMX-BF16 tiles (and AVX512-BF16)" if "avx512_bf16" in flags else "AMX-BF16 tiles"
    if "avx512_bf16" in flags:
        return "AVX512-BF16 dot products, no AMX"
    return "no bf16 instructions (fp32 units only)"


def gemm_rate(dtype: torch.dtype, device: str, m: int, k: int, n: int, seconds: float = 1.5) -> float:
    """GFLOP/s of a bare ``[m, k] @ [k, n]`` product (a Linear's) in ``dtype``."""
    a = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    with torch.inference_mode():
        torch.nn.functional.linear(a, w)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            torch.nn.functional.linear(a, w)
            reps += 1
            if cuda:
                torch.cuda.synchronize()
        return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def encoder_gemm_shapes(backbone, chunk: int | None, batch: int) -> tuple[int, int, int]:
    """(rows, width, hidden) of the encoder's MLP products in one call: a ViT's tokens per call and its
    MLP; another tower: 800 rows through a 768-to-3072 product, a generic shape."""
    from fedclip_lightning.model.backbone import tokens_per_image

    visual = backbone.clip.model.visual
    tokens = tokens_per_image(visual)
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if tokens is not None and blocks is not None:
        fc = blocks[0].mlp.c_fc
        return (chunk or batch) * tokens, fc.in_features, fc.out_features
    return 800, 768, 3072


def flops_per_image(backbone) -> float:
    """FLOPs of one image through the encoder on the path it runs: FlopCounterMode counts the products and
    convolutions (the MHA fast path is one kernel it cannot see into, so that is off while counting). The
    attention's own products are not counted on a CPU (torch has no formula for its CPU kernel): 1% of
    ViT-B/32's FLOPs, 4% of ViT-B/16's, so the rates below are a little low."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedclip_lightning.model.backbone import image_size

    x = torch.randn(2, 3, *image_size(backbone.clip.model.visual), device=backbone.device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            backbone.image_features(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 2


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "pure_fp16": torch.float16}


def compare(feats: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    a = torch.nn.functional.normalize(feats.float(), dim=-1)
    b = torch.nn.functional.normalize(ref.float(), dim=-1)
    return float((a * b).sum(-1).min()), float((a - b).abs().max())


def accuracy_rows(precisions: list[str]) -> None:
    """The demo with each precision: mean client test and unseen accuracy, zero-shot and FedCLIP."""
    import tempfile

    from fedclip_lightning.configure import load_config
    from fedclip_lightning.federation.orchestrator import run

    print("\n  the demo (fedclip-mini, FedCLIP 200 rounds, seed 0), mean client test / unseen accuracy (%):")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in precisions:
            s = run(load_config(["logger=none", "progress=false", f"output_dir={tmp}", f"run_name={precision}",
                                 f"backbone.precision={precision}", f"features.dir={tmp}/features"]))
            z, f = s["zero_shot"], s["final"]
            print(f"  {precision:9}  zero-shot {100 * z['mean_client_test_acc']:6.2f} / {100 * z['mean_unseen_acc']:6.2f}"
                  f"   FedCLIP {100 * f['mean_client_test_acc']:6.2f} / {100 * f['mean_unseen_acc']:6.2f}"
                  f"   (encoded {s['features']['encoded_images']} images)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=PACS)
    ap.add_argument("--per-domain", type=int, default=250, help="images per domain (0: all)")
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256, help="loader batch (features.batch_size; default 256 as in runs)")
    ap.add_argument("--encoder-batch", type=int, default=None,
                    help="images per encoder call (features.encoder_batch_size; default: auto)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the fp32 pass as issue 15 measured it")
    ap.add_argument("--precisions", default=None, help="default: fp32,bf16 on the CPU; fp32,bf16,fp16 on a GPU")
    ap.add_argument("--workers", default=None, help="worker counts for the decode stage (default: 0 and the "
                                                      "pass's own choice)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: both where there is a GPU)")
    ap.add_argument("--accuracy", action="store_true", help="also run the demo in fp32 and bf16 (row 6)")
    args = ap.parse_args()
    if not args.root.is_dir():
        sys.exit(f"{args.root} is missing: pass --root /path/to/PACS (the images beside the checkout: ../shared/data)")
    from fedclip_lightning.model.features import default_workers, encoder_chunk

    samples = samples_of(args.root, args.per_domain)
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"encoder pass over {len(samples)} PACS images, {args.backbone} (random init), batch {args.batch}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for device in devices:
        on_gpu = torch.device(device).type == "cuda"
        precisions = (args.precisions or ("fp32,bf16,fp16" if on_gpu else "fp32,bf16")).split(",")
        auto_workers = default_workers()
        workers = sorted({int(w) for w in args.workers.split(",")} if args.workers else {0, auto_workers})
        print(f"\n[{device}] the pass's loader uses {auto_workers} worker(s) here (features.num_workers=auto)")
        ref_backbone = backbone_for(args, precisions[0], device)
        whole_transform = {w: decode_rate(ref_backbone, samples, args, w, split=False) for w in workers}
        decode = {w: decode_rate(ref_backbone, samples, args, w, split=True) for w in workers}
        for w in workers:
            print(f"  decode + preprocess, {w} worker(s): {decode[w]:8.1f} img/s (uint8 from the workers, "
                  f"normalised call by call: the pass's way); {whole_transform[w]:8.1f} img/s (fp32 per image)")
        # The encoder alone: preprocessed once, in memory.
        from fedclip_lightning.model.features import image_loader

        batches = [x for x, _ in image_loader(ref_backbone, samples, batch_size=args.batch, num_workers=auto_workers)]
        chunk = encoder_chunk(ref_backbone, args.encoder_batch)
        print(f"  encoder calls of {chunk or args.batch} images (features.encoder_batch_size="
              f"{args.encoder_batch if args.encoder_batch is not None else 'auto'}) in batches of {args.batch}")
        baseline = None
        if not args.no_baseline:
            baseline = issue_pass_rate(backbone_for(args, "fp32", device), samples, auto_workers)
            print(f"  the fp32 pass as issue 15 measured it (batches of 256 in one call, fp32 per image from the "
                  f"workers): {baseline:.1f} img/s")
        m, k, n = encoder_gemm_shapes(ref_backbone, chunk, args.batch)
        gemm = {p: (gemm_rate(DTYPES[p], device, m, k, n) + gemm_rate(DTYPES[p], device, m, n, k)) / 2
                for p in precisions if p in DTYPES}
        print(f"  matrix units: {torch.cuda.get_device_name(device) if on_gpu else matrix_units()}; a bare "
              f"product of the encoder's MLP shapes ({m}x{k}x{n} and back): "
              + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in gemm.items()))
        if "fp32" in gemm and len(gemm) > 1:
            print("  so a change of precision can give the encoder at most: "
                  + ", ".join(f"{p} {g / gemm['fp32']:.2f}x" for p, g in gemm.items() if p != "fp32"))
        ref = None
        rows = []
        limits = []
        print(f"  {'precision':9}  {'decode alone':>13}  {'encoder alone':>14}  {'first call':>11}  {'whole pass':>11}  "
              f"{'pass/slowest':>12}  {'pass/shared':>11}  {'cos min vs fp32':>15}  {'max |diff|':>10}")
        for precision in precisions:
            backbone = backbone_for(args, precision, device)
            enc, first, feats = encoder_rate(backbone, batches, chunk)
            flops = flops_per_image(backbone)
            if backbone.clip.class_token_only:  # against the tower's own forward, interleaved
                fast, own, gain, n_images = class_token_gain(backbone, batches, chunk)
                backbone.clip.class_token_only = False
                own_flops = flops_per_image(backbone)
                backbone.clip.class_token_only = True
                limits.append(f"{precision}: class-token-only last block {fast:.1f} img/s ({flops / 1e9:.2f} GFLOP "
                              f"per image) against the tower's own forward {own:.1f} img/s ({own_flops / 1e9:.2f}"
                              f" GFLOP), medians of 8 alternations on {n_images} images: {gain:.3f}x")
            if precision in gemm:
                limits.append(f"{precision}: the encoder at {enc * flops / 1e9:.0f} GFLOP/s, "
                              f"{enc * flops / 1e9 / gemm[precision]:.2f} of the bare product's rate")
            whole = pass_rate(backbone, samples, args, auto_workers)
            rows.append((precision, whole))
            # The decode stage as this precision's pass runs it (the last step casts to its input dtype).
            dec = decode_rate(backbone, samples, args, auto_workers, split=True)
            slowest = min(enc, dec)
            # Both stages alone had every core; sharing them, the pass can at best take the sum of their
            # times per image (the bound where there are no spare cores for decoding, as on 2 cores).
            shared = 1 / (1 / enc + 1 / dec)
            if precision == "fp32":
                ref = feats
            against = f"{'(no fp32 row)':>15}  {'':>10}"
            if ref is not None:
                cos, diff = compare(feats, ref)
                against = f"{cos:15.6f}  {diff:10.2e}"
            print(f"  {precision:9}  {dec:9.1f} img/s  {enc:10.1f} img/s  {first:9.2f} s  {whole:7.1f} img/s  "
                  f"{whole / slowest:12.2f}  {whole / shared:11.2f}  {against}")
        for line in limits:
            print(f"  {line}")
        if baseline:
            print("  the pass against the fp32 pass as issue 15 measured it: "
                  + ", ".join(f"{p} {w / baseline:.2f}x" for p, w in rows) + " (issue 15's target for bf16: >= 4x"
                  + (f"; this machine's bf16 product runs at {gemm['bf16'] / gemm['fp32']:.2f}x its fp32 one)"
                     if {"bf16", "fp32"} <= set(gemm) else ")"))
    if args.accuracy:
        accuracy_rows(["fp32", "bf16"])


if __name__ == "__main__":
    main()
