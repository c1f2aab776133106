"""Base-to-novel generalisation (``data.classes.split=base_novel``, the protocol of CoCoOp and FedTPG).

The run trains and validates on the base classes (the first half of the classes in sorted order, rounded
up); its rounds, its selection and its table are those of a run on the base classes alone. At the end the
final model is scored on each participant's test images three ways, each with its own class prompts: the
base classes, the novel classes (never seen in training), and all of them; with the zero-shot baseline on
the same splits. The headline is the harmonic mean of base and novel accuracy.

The base and the novel images are split on their own (``data.pipeline.base_novel_tasks``), so the novel
evaluation sets are the ones a run with ``data.classes.keep=<novel classes>`` would test on.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..algorithms.base import CLIPAlgorithm
from ..config import Config
from ..data.pipeline import base_novel_tasks, class_prompt_names
from ..errors import ConfigError
from ..report import RoundMetrics
from .datasets import build_datasets
from .server import zero_shot_algorithm
from .transport import evaluate_once


def check(cfg: Config, algorithm) -> None:
    """What base-to-novel cannot score, said before the run trains."""
    if not isinstance(algorithm, CLIPAlgorithm) or not algorithm.scores_any_class:
        trains = algorithm.what_trains(algorithm.config)
        raise ConfigError(f"data.classes.split=base_novel: algorithm={algorithm.name} trains {trains}, a part for "
                          "each training class, and cannot score the novel ones. Fix: use an algorithm that scores "
                          "classes by their prompts (fedclip, promptfl without csc, clip_adapter, ...), or "
                          "data.classes.split=all.")
    if type(algorithm).personalize is not CLIPAlgorithm.personalize:
        raise ConfigError(f"data.classes.split=base_novel: algorithm={algorithm.name} personalises its models on "
                          "each client's training images at evaluation, and base-to-novel is scored for models "
                          "that are as trained. Fix: use fedclip, local, promptfl, ..., or data.classes.split=all.")


def harmonic_mean(base: float, novel: float) -> float:
    if not (math.isfinite(base) and math.isfinite(novel)) or base + novel <= 0:
        return float("nan")
    return 2 * base * novel / (base + novel)


def _block(base: RoundMetrics, novel: RoundMetrics, whole: RoundMetrics) -> dict:
    out = {}
    for where, get in (("clients", lambda m: m.mean_client_test_acc), ("unseen", lambda m: m.mean_unseen_acc)):
        b, n = get(base), get(novel)
        out[where] = {"base": b, "novel": n, "hm": harmonic_mean(b, n), "all": get(whole)}
    return out


def evaluate(cfg: Config, ctx, algorithm, final: RoundMetrics, zero_shot: RoundMetrics | None) -> dict:
    """The final model (and zero-shot CLIP where the run evaluated it) on the novel and on all classes, on
    every process together: ``summary.json: base_novel``."""
    base_task, novel_task, whole_task = base_novel_tasks(cfg)
    scored: dict[str, dict[str, RoundMetrics]] = {"final": {}, "zero_shot": {}}
    with torch.random.fork_rng(devices=[]):  # making clients draws initial weights: nothing after sees it
        for name, task in (("novel", novel_task), ("all", whole_task)):
            vctx = dataclasses.replace(ctx, task=task, prompts=class_prompt_names(task.classes, cfg.data.class_names),
                                       datasets={}, eval_loaders={})
            vctx.datasets, _ = build_datasets(cfg, ctx.fabric, ctx.backbone, task, vctx.mine)
            vctx.prepare_eval_loaders()
            with algorithm.classes_of(vctx):
                scored["final"][name] = evaluate_once(vctx, algorithm)[0]
            if zero_shot is not None:
                zs = zero_shot_algorithm(cfg)
                zs.setup(vctx)
                scored["zero_shot"][name] = evaluate_once(vctx, zs)[0]
    out = {"base_classes": list(base_task.classes), "novel_classes": list(novel_task.classes), "round": final.round,
           "final": _block(final, scored["final"]["novel"], scored["final"]["all"])}
    if zero_shot is not None:
        out["zero_shot"] = _block(zero_shot, scored["zero_shot"]["novel"], scored["zero_shot"]["all"])
    return out
