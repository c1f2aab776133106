"""Parameter-efficient heads on a frozen CLIP, besides FedCLIP's attention adapter (``adapter.py``).

A head is an ``nn.Module`` whose parameters are all that trains and travels. ``forward(x)`` turns raw
frozen image features ``[B, d]`` into normalised features; ``class_features(text)`` gives the
normalised class features that they are compared with (``text``: the frozen prompt features).

* ``ResidualMLPAdapter`` (CLIP-Adapter, Gao et al. 2021, github.com/gaopengcuhk/CLIP-Adapter):
  ``normalize(alpha * relu(W2 relu(W1 x)) + (1 - alpha) * x)``, ``W1: d -> d/r``, ``W2: d/r -> d``,
  no biases (as its reference): ``2 d^2 / r`` parameters (131,072 for d = 512, r = 4).
  ``alpha = 0`` is zero-shot CLIP.
* ``LinearProbe``: class weights ``W [C, d]`` on the normalised image features, initialised with the
  class-prompt features (a zero-shot-initialised probe: at round 0 it *is* zero-shot CLIP), no bias:
  ``C d`` parameters.
* ``PromptLearner`` (CoOp, Zhou et al. 2022; federated: PromptFL, Guo et al. 2023): ``n_ctx``
  learnable context vectors of the text encoder's width take the place of the prompt's first words,
  ``[SOS] ctx_1 ... ctx_n <class name tokens> . [EOS]`` (class token at the end, one context shared by
  all classes, or with ``csc`` one per class: CoOp's class-specific context); the frozen text encoder turns
  them into class features, once per step for all classes. ``n_ctx x width`` parameters (16 x 512 = 8,192
  for ViT-B-32), ``C x n_ctx x width`` with ``csc``.
* ``PromptGenerator`` (FedTPG): the context generated from the class names' text features.
* ``ConditionalPromptLearner`` (CoCoOp): the context shifted for each image by a small meta-net of its
  features, so the class features are the image's own (``class_features_for(feats) -> [B, C, d]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualMLPAdapter(nn.Module):
    def __init__(self, dim: int, reduction: int = 4, alpha: float = 0.2):
        super().__init__()
        self.alpha = alpha
        self.fc1 = nn.Linear(dim, dim // reduction, bias=False)
        self.fc2 = nn.Linear(dim // reduction, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        y = F.relu(self.fc2(F.relu(self.fc1(x))))
        return F.normalize(self.alpha * y + (1 - self.alpha) * x, dim=-1)


class LinearProbe(nn.Module):
    def __init__(self, text_features: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(text_features.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    def class_features(self, text: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - the probe replaces them
        return self.weight


def _check_fits(tokenizer, texts: list[str], class_names: list[str], length: int, n_ctx: int,
                init: str | None) -> None:
    """Every class's prompt (SOS, the context, the class name, '.', EOS) fits the text tower's context: a
    tokenizer cuts what does not, and prompts cut before their class name are all the same."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(tokenizer, SimpleTokenizer):  # its padding id is 0 (others: not checked here)
        return
    need = (tokenizer(texts, context_length=length + n_ctx + 256) != 0).sum(dim=1)
    if int(need.max()) <= length:
        return
    from ..errors import ConfigError

    i = int(need.argmax())
    cut = [name for name, n in zip(class_names, need.tolist()) if n > length]
    room = length - (int(need.max()) - n_ctx)
    key = f"algorithm.ctx_init={init!r} ({n_ctx} tokens)" if init else f"algorithm.n_ctx={n_ctx}"
    fix = (f"use at most {room} context tokens (algorithm.n_ctx={room}, or a shorter algorithm.ctx_init)" if room >= 1
           else "use a backbone with a longer text context (shorter class names: data.class_names)")
    raise ConfigError(f"{key}: the prompt of class {class_names[i]!r} needs {int(need[i])} tokens, but the text "
                      f"tower's context holds {length}, so {len(cut)} of {len(class_names)} class names would be cut "
                      f"off and their prompts could not tell the classes apart. Fix: {fix}.")


def _phrase_tokens(tokenizer, phrase: str):
    """A phrase's tokens, SOS and EOS included, all of them: open_clip's tokenizer cuts at the text tower's context,
    which would count a phrase too long for it as shorter than it is (``_check_fits`` then refuses it by its
    true length). Other tokenizers: as they tokenize."""
    from open_clip.tokenizer import SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):  # a token is at least one character
        return tokenizer([phrase], context_length=max(tokenizer.context_length, len(phrase) + 2))[0]
    return tokenizer([phrase])[0]


class PromptLearner(nn.Module):
    """CoOp's context on a frozen open_clip text tower (not a submodule: only ``ctx`` is state): unified
    (``ctx [n_ctx, width]``, shared by all classes), or class-specific (``csc``: ``ctx [C, n_ctx, width]``).

    ``init``: a phrase whose token embeddings start the context (``n_ctx`` = its number of tokens), or
    None for CoOp's random init (normal, std 0.02, seeded by the caller).
    """

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], n_ctx: int = 16,
                 init: str | None = None, csc: bool = False):
        super().__init__()
        object.__setattr__(self, "clip", clip)
        emb = clip.token_embedding
        if init:
            init_tokens = _phrase_tokens(tokenizer, init)
            n_ctx = int((init_tokens > 0).sum()) - 2  # without SOS and EOS
        placeholder = " ".join(["X"] * n_ctx)
        texts = [f"{placeholder} {name}." for name in class_names]
        tokens = tokenizer(texts).to(emb.weight.device)
        _check_fits(tokenizer, texts, class_names, tokens.shape[1], n_ctx, init)
        with torch.no_grad():
            embedded = emb(tokens).float()
            shape = (len(class_names), n_ctx, embedded.shape[-1]) if csc else (n_ctx, embedded.shape[-1])
            if init:  # the phrase's embeddings; with csc every class's context starts from them
                ctx = emb(init_tokens[1:1 + n_ctx].to(emb.weight.device)).float().expand(shape).clone()
            else:
                ctx = torch.empty(shape).normal_(std=0.02)
        self.ctx = nn.Parameter(ctx.to(emb.weight.device))
        self.n_ctx = n_ctx
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1], persistent=False)  # SOS
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:], persistent=False)  # class tokens, '.', EOS, pad
        self._cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    def prompts(self) -> torch.Tensor:
        """The prompt embeddings ``[C, L, width]``: SOS, the context, the class name and what follows."""
        c = self.prefix.shape[0]
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(c, -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    def class_features(self, text: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - made from the parameters
        if not torch.is_grad_enabled():  # evaluation: once per state of the parameters, not once per batch
            version = tuple(p._version for p in self.parameters())
            if self._cache is None or self._cache[0] != version:
                self._cache = (version, self._encode())
            return self._cache[1]
        return self._encode()

    def _encode(self, prompts: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """open_clip's ``encode_text`` from the embeddings on (argmax pooling: the EOS token), of this context's
        ``prompts()`` or of the ``prompts`` given (with their ``tokens``)."""
        m = self.clip
        dtype = m.transformer.get_cast_dtype()
        prompts, tokens = (self.prompts(), self.tokens) if prompts is None else (prompts, tokens)
        x = prompts.to(dtype) + m.positional_embedding.to(dtype)
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)


class PromptGenerator(PromptLearner):
    """FedTPG's text-driven prompt generator (Qiu et al., ICLR 2024): the context is not learned directly but
    generated from the text embeddings of the task's class names, so it can prompt classes no client saw.

    ``n_ctx`` learned queries attend to the class names' frozen text features ``T [C, e]`` (cross-attention:
    ``softmax(Q (T W_k)^T / sqrt(h)) (T W_v)``, width ``h``), and a two-layer MLP maps each attended vector to
    a context vector of the text tower's width; the context, shared by the task's classes, then prompts each
    class as CoOp's does. Parameters: ``n_ctx h + 2 e h + (h h + h) + (h w + w)``, none of them per class.
    """

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], names: torch.Tensor, n_ctx: int = 4,
                 hidden: int = 128):
        super().__init__(clip, tokenizer, class_names, n_ctx)
        del self.ctx  # generated, not learned
        width = self.prefix.shape[-1]
        e = names.shape[-1]
        self.register_buffer("names", names.detach().float(), persistent=False)  # the class names' features
        self.query = nn.Parameter(torch.empty(n_ctx, hidden).normal_(std=0.02))
        self.key = nn.Linear(e, hidden, bias=False)
        self.value = nn.Linear(e, hidden, bias=False)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, width))

    @property
    def ctx(self) -> torch.Tensor:  # type: ignore[override]
        """The context ``[n_ctx, width]`` generated from the class names."""
        k, v = self.key(self.names), self.value(self.names)
        attn = torch.softmax(self.query @ k.T / k.shape[-1] ** 0.5, dim=-1)
        return self.mlp(attn @ v)


class ConditionalPromptLearner(PromptLearner):
    """CoCoOp's image-conditioned context (Zhou et al., CVPR 2022, github.com/KaiyangZhou/CoOp ``cocoop.py``):
    CoOp's unified context ``ctx [n_ctx, width]`` plus, for each image, a shift ``pi = meta_net(f)`` of its
    normalised features ``f [e]``: the meta-net is ``linear2(relu(linear1(f)))``, ``e -> e/16 -> width``
    (with biases). Image ``i`` prompts every class with ``ctx + pi_i`` (the same shift in every context
    position), so its class features ``T_i [C, d]`` are its own and its logits are ``s f_i . T_i[c]``: the text
    tower runs ``B x C`` prompts for a batch of ``B`` images. Parameters: ``n_ctx w + e (e/16) + e/16 +
    (e/16) w + w`` (35,360 for ViT-B/32), none of them per class, so it prompts new classes."""

    conditioned = True
    PROMPTS_PER_CALL = 1024  # without gradients (evaluation): the text tower's batch of prompts at most

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], embed_dim: int, n_ctx: int = 4,
                 init: str | None = None):
        super().__init__(clip, tokenizer, class_names, n_ctx, init)
        from collections import OrderedDict

        width, hidden = self.ctx.shape[-1], max(1, embed_dim // 16)
        self.meta_net = nn.Sequential(OrderedDict([("linear1", nn.Linear(embed_dim, hidden)), ("relu", nn.ReLU()),
                                                   ("linear2", nn.Linear(hidden, width))]))
        self.meta_net.to(self.ctx.device)

    def shifted(self, feats: torch.Tensor) -> torch.Tensor:
        """Each image's context ``ctx + meta_net(f)``: ``[B, n_ctx, width]``."""
        return self.ctx.unsqueeze(0) + self.meta_net(feats.float()).unsqueeze(1)

    def class_features(self, text: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - made from the context
        """The class features of the unshifted context (``pi = 0``): not what CoCoOp scores with (that is
        ``class_features_for``); for inspection."""
        return self._encode()

    def class_features_for(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalised class features of each image's own prompts: ``[B, C, d]`` for ``feats [B, e]`` (the
        normalised image features). Without gradients the prompts go through the text tower in calls of at
        most ``PROMPTS_PER_CALL``."""
        c = self.prefix.shape[0]
        ctx = self.shifted(feats)  # [B, n_ctx, w]
        step = len(feats) if torch.is_grad_enabled() else max(1, self.PROMPTS_PER_CALL // c)
        out = []
        for i in range(0, len(feats), step):
            part = ctx[i:i + step]
            b = part.shape[0]
            prompts = torch.cat([self.prefix.expand(b, -1, -1, -1).reshape(b * c, 1, -1),
                                 part.unsqueeze(1).expand(-1, c, -1, -1).reshape(b * c, self.n_ctx, -1),
                                 self.suffix.expand(b, -1, -1, -1).reshape(b * c, self.suffix.shape[1], -1)], dim=1)
            out.append(self._encode(prompts, self.tokens.repeat(b, 1)).view(b, c, -1))
        return torch.cat(out)
