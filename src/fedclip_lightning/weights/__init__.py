"""Weights that ship with the package.

``fedclip-mini-synthetic.pt``: the small CLIP that ``fedclip-lightning-pretrain``
(:mod:`fedclip_lightning.pretrain`) trains on captioned synthetic shapes; the demo's
backbone (``conf/backbone/mini_clip.yaml``). Configs name it with the resolver
``${fedclip_weights:fedclip-mini-synthetic}``, which gives the file's path, so it
loads through ``backbone.pretrained=<file>`` like any other checkpoint.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def path(name: str) -> str:
    p = HERE / f"{name}.pt"
    if not p.is_file():
        shipped = sorted(q.stem for q in HERE.glob("*.pt"))
        raise FileNotFoundError(f"no shipped weights {name!r} in {HERE} (there are: {shipped or 'none'}). Fix: "
                                "reinstall the package, or rebuild them with fedclip-lightning-pretrain.")
    return str(p)
