"""The frozen CLIP backbone, loaded once per process and shared by every client.

``pretrained`` may be an open_clip tag (``openai``, ``laion2b_s34b_b79k``...),
a local checkpoint file, or ``None`` for random initialisation. Tags are looked
up in the local caches first (open_clip's URL cache and the Hugging Face hub
cache) so a machine without internet uses weights it already has; a missing
checkpoint ends in a :class:`BackboneError` that says where we looked and how
to pass a local file.

Every parameter is frozen (``logit_scale`` too) and the model stays in eval mode
whatever ``.train()`` is called with: RN backbones carry BatchNorm, which the
reference release wrongly runs in train mode.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import PRECISIONS, BackboneConfig
from ..errors import BackboneError, Problems
from ..numerics import cpuinfo

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def register_tiny_configs() -> None:
    """Register the project's model configs (fedclip-tiny-vit, fedclip-tiny-rn, fedclip-mini) with open_clip."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


class FrozenCLIP(nn.Module):
    """A CLIP model with no trainable parameter that never leaves eval mode."""

    def __init__(self, model: nn.Module, class_token_only: bool = False):
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        # The image features are the class token's: the last block need not run its MLP on the others
        # (``class_token_features``). Asked for in bf16 only (``_load``); kept only where it checks out.
        self.class_token_only = class_token_only and class_token_tower(model) and self._class_token_checks()

    def train(self, mode: bool = True) -> "FrozenCLIP":  # noqa: ARG002 - frozen means eval, always
        self.training = False
        self.model.eval()
        return self

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) image features, returned in fp32. The images go in at the dtype of the
        tower's first weight layer (under mixed fp16 some parameters, the class embedding say, stay fp32)."""
        x = images.to(input_dtype(self.model.visual))
        if self.class_token_only:
            return class_token_features(self.model.visual, x).float()
        return self.model.encode_image(x).float()

    @torch.no_grad()
    def _class_token_checks(self) -> bool:
        """The class-token path against the model's own ``encode_image`` on two seeded random images: a
        tower whose forward differs from what ``class_token_features`` mirrors (another open_clip release,
        a patched block) by more than 2% of its largest feature keeps its full forward, with a warning.
        Hooks on the tower's modules see the class token alone in the last block."""
        visual = self.model.visual
        x = torch.randn(2, 3, *image_size(visual), generator=torch.Generator().manual_seed(0))
        x = x.to(next(visual.parameters()).device, input_dtype(visual))
        full = self.model.encode_image(x).float()
        fast = class_token_features(visual, x).float()
        if fast.shape != full.shape:
            gap = f"shape {tuple(fast.shape)} against {tuple(full.shape)}"
        else:
            # On a CPU the bf16 path gives the same bits; the margin is for other devices' kernels (a GPU
            # may round rows of a smaller product otherwise). A structural difference moves features by far more.
            diff, scale = float((fast - full).abs().max()), float(full.abs().max())
            if diff <= 2e-2 * scale + 1e-6:
                return True
            gap = f"largest difference {diff:.3g} against features up to {scale:.3g}"
        log.warning("the image tower's class-token path does not reproduce its own forward (%s): running the "
                    "full forward, a little slower, with the tower's own features", gap)
        return False

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens).float()


@dataclass
class Backbone:
    """What clients share: the frozen model, its eval transform and tokenizer."""

    name: str
    pretrained: str | None
    clip: FrozenCLIP
    preprocess: Callable
    tokenizer: Callable
    embed_dim: int
    logit_scale: float  # exp(logit_scale) of the frozen model, a plain float
    weights_file: str | None  # the checkpoint actually loaded (None: random init)
    precision: str = "fp32"  # what the frozen encoder runs in
    create_options: dict = field(default_factory=dict)  # open_clip creation options (QuickGELU, image mean/std...)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def to(self, device: torch.device | str) -> "Backbone":
        self.clip.to(device)
        return self

    @torch.no_grad()
    def text_features(self, class_names: list[str], prompt: str = "a picture of a {}") -> torch.Tensor:
        """L2-normalised prompt features, one row per class, fp32 on the backbone's device."""
        tokens = self.tokenizer([prompt.format(c) for c in class_names]).to(self.device)
        feats = self.clip.encode_text(tokens)
        return feats / feats.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images.to(self.device, non_blocking=True))


def image_size(visual: nn.Module) -> tuple[int, int]:
    """(height, width) of the images an open_clip image tower takes (224 where it does not say)."""
    size = getattr(visual, "image_size", 224)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def tokens_per_image(visual: nn.Module) -> int | None:
    """Tokens a vision transformer's blocks see per image (its patches and the class token); None for
    another tower."""
    grid = getattr(visual, "grid_size", None)
    return int(grid[0]) * int(grid[1]) + 1 if grid is not None else None


def class_token_tower(model: nn.Module) -> bool:
    """Is ``model`` an open_clip CLIP whose image features are its vision transformer's class token (pool
    ``tok``, no attentional pooler, no token output), with the stock blocks that ``class_token_features``
    mirrors? Anything else (ResNets, timm or Hugging Face towers, CoCa, mean pooling) runs its own forward."""
    try:
        from open_clip.model import CLIP, CustomTextCLIP
        from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer
    except ImportError:
        return False
    visual = getattr(model, "visual", None)
    if type(model) not in (CLIP, CustomTextCLIP) or type(visual) is not VisionTransformer:
        return False
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    return (getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
            and not getattr(visual, "output_tokens", True) and hasattr(visual, "_embeds")
            and hasattr(visual, "_pool") and type(visual.transformer) is Transformer
            and getattr(visual.transformer, "batch_first", False) and blocks is not None and len(blocks) > 0
            and all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv") for b in blocks))


def class_token_features(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``VisionTransformer.forward`` for a tower that pools its class token, with the last
    block's second half (LayerNorm, MLP) on the class token alone: after the last attention nothing mixes
    tokens, and every token but the first is thrown away. The attention itself still sees every token.
    That MLP is two thirds of the last block's work; in ViT-B/32, one block of twelve, it is 5% of the
    tower's FLOPs (8.26 against 8.73 GFLOP an image; the speed-up is in benchmarks/encoder_pass.py). Row
    for row the same operations: in bf16 on a CPU the same bits (tests/test_model.py); in fp32 the matrix
    kernels may block a call of a few rows differently (up to 1.7e-6)."""
    x = visual._embeds(x)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    x = x + last.ls_1(last.attention(q_x=last.ln_1(x)))
    x = x[:, :1]
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


# Ours -> open_clip's. "fp16" is open_clip's mixed fp16: the weights of the linear and convolution layers in
# fp16, LayerNorm computed in fp32 (LayerNormFp32), which is what OpenAI's clip.load gives the reference
# (convert_weights + its fp32 LayerNorm). "pure_fp16" casts everything, LayerNorm and embeddings included.
def input_dtype(tower: torch.nn.Module) -> torch.dtype:
    """The dtype of the first convolution or linear layer of ``tower``: what its input must be."""
    for mod in tower.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            return mod.weight.dtype
    return next(tower.parameters()).dtype


_PRECISION = {"fp32": "fp32", "bf16": "pure_bf16", "fp16": "fp16", "pure_fp16": "pure_fp16"}


def cpu_has_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX-BF16, as Linux's /proc/cpuinfo lists its
    flags)? Elsewhere (no such file) the answer is no: ``fast`` stays fp32 there."""
    flags = set(cpuinfo("flags").split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto``: the reference's numerics, fp16 on a GPU (what its clip.load gives), fp32 elsewhere.
    ``fast``: the fastest precision the device runs natively: bf16 on a CPU with AVX512-BF16 or AMX and on
    a GPU that has bf16, fp16 on other GPUs, fp32 on other CPUs."""
    device = torch.device(device)
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fast":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    return precision
_CACHE: dict[tuple, Backbone] = {}


def load_backbone(cfg: BackboneConfig, device: torch.device | str = "cpu", seed: int = 0) -> Backbone:
    """Load (once per process) the frozen backbone that ``cfg`` names.

    Random initialisation is seeded with ``seed`` so that every process of a
    run builds the same random model.
    """
    key = (cfg.name, cfg.pretrained, cfg.cache_dir, cfg.precision, cfg.quick_gelu, str(device), seed)
    if key not in _CACHE:
        _CACHE[key] = _load(cfg, device, seed)
    return _CACHE[key]


def _canonical(name: str) -> str:
    """open_clip spells ViT-B/32 as ViT-B-32 in its registries."""
    return name if name.startswith(("hf-hub:", "local-dir:")) else name.replace("/", "-")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not a model open_clip can build (None when it is)."""
    import open_clip

    register_tiny_configs()
    if name.startswith(("hf-hub:", "local-dir:")) or name.replace("/", "-") in open_clip.list_models():
        return None
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (f"backbone.name={name!r} is not an open_clip model.{hint} Fix: pick one of open_clip.list_models() "
            "(e.g. ViT-B-32), or fedclip-tiny-vit for a tiny random test model.")


def resolve_weights(cfg: BackboneConfig) -> tuple[str | None, dict]:
    """Check the model name and find its weights, without building the model.

    Returns ``(checkpoint file or None, extra create_model kwargs)``; raises
    BackboneError for an unknown model, an unknown tag or absent weights.
    Cheap, so the command line calls it before any process is launched.
    """
    import open_clip

    register_tiny_configs()
    name = _canonical(cfg.name)
    is_schema = name.startswith(("hf-hub:", "local-dir:"))
    problem = model_name_problem(name)
    if problem:
        raise BackboneError(problem)

    kwargs: dict = {}
    weights_file: str | None = None
    pretrained = cfg.pretrained if cfg.pretrained not in (None, "", "none", "None") else None
    quick_gelu = cfg.quick_gelu
    if is_schema:
        if pretrained:
            log.warning("backbone.pretrained is ignored for %s: the weights come with the schema", name)
        pretrained = None
    elif pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            weights_file = _find_cached(tag_cfg, cfg.cache_dir) or _download(name, pretrained, tag_cfg, cfg)
            if quick_gelu is None:
                quick_gelu = bool(tag_cfg.get("quick_gelu", False))
            for k in ("mean", "std", "interpolation", "resize_mode"):
                if k in tag_cfg:
                    kwargs[f"image_{k}"] = tag_cfg[k]
        elif Path(pretrained).expanduser().is_file():
            weights_file = str(Path(pretrained).expanduser())
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneError(
                f"backbone.pretrained={pretrained!r} is neither a pretrained tag of {name} nor an existing file. "
                f"Fix: pass a checkpoint file (backbone.pretrained=/path/to/{name}.pt), one of the tags "
                f"{tags or '(none for this model)'}, or backbone.pretrained=null for random weights."
            )
    if quick_gelu:
        kwargs["force_quick_gelu"] = True
    return weights_file, kwargs


def _load(cfg: BackboneConfig, device: torch.device | str, seed: int) -> Backbone:
    import open_clip

    weights_file, extra = resolve_weights(cfg)
    name = _canonical(cfg.name)
    pretrained = None if name.startswith(("hf-hub:", "local-dir:")) else (
        cfg.pretrained if cfg.pretrained not in (None, "", "none", "None") else None)
    precision = resolve_precision(cfg.precision, device)
    kwargs: dict = dict(precision=_PRECISION[precision], device=device, cache_dir=cfg.cache_dir, **extra)
    try:
        # A private RNG stream: the random init depends on `seed` alone, and the caller's RNG is untouched.
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            jit_state = _torchscript_state(weights_file) if weights_file else None
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if jit_state is not None else weights_file, **kwargs)
            if jit_state is not None:
                _load_torchscript_state(model, jit_state)
    except BackboneError:
        raise
    except Exception as exc:  # a corrupt or mismatched checkpoint, an unreachable hf-hub repo...
        where = weights_file or name
        raise BackboneError(
            f"could not load backbone.name={name!r} with weights {where!r}: {exc}. "
            "Fix: check that the checkpoint matches the model architecture and is a complete file."
        ) from None
    tokenizer = open_clip.get_tokenizer(name)
    # bf16, the fast precision, also leaves out the work whose result is thrown away; fp32 and fp16, the
    # reference's numerics, run the tower's own forward, bit for bit as before.
    clip = FrozenCLIP(model, class_token_only=precision == "bf16")
    embed_dim = int(clip.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return Backbone(
        name=name,
        pretrained=pretrained,
        clip=clip,
        preprocess=preprocess,
        tokenizer=tokenizer,
        embed_dim=embed_dim,
        logit_scale=float(model.logit_scale.detach().float().exp()),
        weights_file=weights_file,
        precision=precision,
        create_options={k: (list(v) if isinstance(v, tuple) else v) for k, v in extra.items()},
    )


def _torchscript_state(path: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a TorchScript archive (OpenAI's own ``ViT-B-32.pt``, what ``clip.load`` downloads),
    or None for an ordinary checkpoint. open_clip reads those with ``weights_only=True``, which refuses
    TorchScript."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        if not any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist()):
            return None
    return dict(torch.jit.load(path, map_location="cpu").state_dict())


def _load_torchscript_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a TorchScript archive's tensors into ``model``: OpenAI's names are open_clip's; the archive's
    extra entries (input_resolution, context_length, vocab_size, attention masks) are not parameters."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BackboneError(f"the TorchScript checkpoint lacks {len(missing)} tensors of this model "
                            f"(e.g. {missing[:3]}). Fix: check that backbone.name matches the checkpoint.")
    model.load_state_dict({k: state[k] for k in own})


def _hf_candidates(tag_cfg: dict) -> list[tuple[str, str]]:
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return []
    repo, filename = os.path.split(hub)
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return [(repo, n) for n in names]


def _url_cache_paths(tag_cfg: dict, cache_dir: str | None) -> list[Path]:
    url = tag_cfg.get("url", "")
    if not url:
        return []
    base = os.path.basename(url)
    dirs = [Path(cache_dir)] if cache_dir else []
    dirs.append(Path("~/.cache/clip").expanduser())
    return [d / base for d in dirs]


def _find_cached(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """A checkpoint for this tag already on disk, found without any network access.

    The Hugging Face cache first (open_clip's own format), in ``cache_dir`` and
    in the default cache; then open_clip's URL cache (``~/.cache/clip`` holds
    OpenAI's TorchScript files, which :func:`_load` converts).
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        try_to_load_from_cache = None
    if try_to_load_from_cache is not None:
        for hf_dir in ([cache_dir] if cache_dir else []) + [None]:
            for repo, filename in _hf_candidates(tag_cfg):
                found = try_to_load_from_cache(repo, filename, cache_dir=hf_dir)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    for path in _url_cache_paths(tag_cfg, cache_dir):
        if path.is_file():
            return str(path)
    return None


def _download(name: str, tag: str, tag_cfg: dict, cfg: BackboneConfig) -> str:
    import open_clip

    looked = [str(p) for p in _url_cache_paths(tag_cfg, cfg.cache_dir)]
    looked += [f"Hugging Face cache: {repo}/{fn}" for repo, fn in _hf_candidates(tag_cfg)]
    offline = not cfg.download or os.environ.get("HF_HUB_OFFLINE") == "1"
    reason = "downloads are off (backbone.download=false or HF_HUB_OFFLINE=1)"
    if not offline and not _reachable(tag_cfg):
        offline, reason = True, "the download servers cannot be reached from this machine"
    if not offline:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            with _quiet_open_clip():
                path = open_clip.download_pretrained(tag_cfg, cache_dir=cfg.cache_dir)
            if path and os.path.isfile(path):
                return path
            reason = "the download returned no file"
        except Exception as exc:  # no network, a proxy, a missing repo...
            reason = f"the download failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        finally:
            socket.setdefaulttimeout(old)
    raise BackboneError(
        f"no weights for backbone.name={name!r} with backbone.pretrained={tag!r}: not in the local caches "
        f"({'; '.join(looked)}) and {reason}. "
        f"Fix: download the checkpoint on a machine with internet and pass it as "
        f"backbone.pretrained=/path/to/checkpoint (a .pt/.bin/.safetensors file), or put it in one of the caches "
        f"above (backbone.cache_dir sets the folder)."
    )


def _reachable(tag_cfg: dict, timeout: float = 5.0) -> bool:
    """A quick TCP check, so a machine without internet fails in seconds, not after minutes of retries."""
    from urllib.parse import urlparse

    hosts = []
    if tag_cfg.get("hf_hub"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        hosts.append(urlparse(endpoint).hostname)
    if tag_cfg.get("url"):
        hosts.append(urlparse(tag_cfg["url"]).hostname)
    for host in filter(None, hosts):
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                return True
        except OSError:
            continue
    return False


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs a WARNING for every random init; we say it once ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def check_config(b: BackboneConfig, p: Problems) -> None:
    """The ``backbone.*`` keys' own problems (whether the weights exist is found when they load)."""
    p.choice("backbone.precision", b.precision, PRECISIONS)
    if not b.name:
        p.bad("backbone.name", b.name, "empty model name", "e.g. backbone.name=ViT-B-32")
    elif problem := model_name_problem(b.name):
        p.add(problem)
