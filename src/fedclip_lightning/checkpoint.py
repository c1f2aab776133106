"""Checkpoints: everything a resumed run needs to end exactly where an uninterrupted one would.

After a round (every ``federation.checkpoint_interval`` rounds, and when
preempted) the run directory gets ``checkpoints/round-000012/``:

* ``meta.pt``, written by rank 0: the round, the algorithm's server state, the model
  selection (best round so far and its metrics), the communication counters,
  the per-round timings, the W&B run id and the resolved config;
* ``clients-rank<k>.pt``, one per rank: the persistent state of that rank's
  clients by client name (what the algorithm keeps per client: a client's own
  adapter for ``local``, its Adam state with ``optimizer_state=keep``), so a
  resumed run may place clients differently.

Every file is written to a temporary name and renamed; the folder counts only
once ``COMPLETE`` exists in it, which rank 0 writes after a barrier. The newest
complete folders (``federation.keep_checkpoints``) are kept. Files are loaded
with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and
dicts only. No random generator state needs saving: every random stream derives
from the seed and the (round, client) pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .files import atomic_save

log = logging.getLogger(__name__)

FORMAT = 3  # 2: the server state is the algorithm's (meta['server']); 3: COMPLETE lists the files it seals
COMPLETE = "COMPLETE"

# Config keys that may differ between a run and its resumption: they change
# neither the arithmetic nor the result.
RESUMABLE_DIFFERENCES = ("progress", "plots", "run_name", "output_dir", "resume", "fabric", "logger", "features", "note", "label",
                         "federation.rounds", "federation.checkpoint_interval", "federation.keep_checkpoints",
                         "federation.checkpoint_min_seconds",
                         "data.num_workers", "data.eval_batch_size", "backbone.download", "backbone.cache_dir")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def round_dir(run_dir: Path, server_round: int) -> Path:
    return checkpoint_root(run_dir) / f"round-{server_round:06d}"


def save_client_shard(run_dir: Path, server_round: int, rank: int, clients: dict[str, dict[str, Any]]) -> None:
    d = round_dir(run_dir, server_round)
    d.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": FORMAT, "round": server_round, "clients": clients}, d / f"clients-rank{rank}.pt")


def save_meta(run_dir: Path, server_round: int, meta: dict[str, Any]) -> None:
    d = round_dir(run_dir, server_round)
    d.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": FORMAT, "round": server_round, **meta}, d / "meta.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mark_complete(run_dir: Path, server_round: int, keep: int) -> None:
    """Seal a checkpoint (after every rank wrote its shard): ``COMPLETE`` lists every file of the folder
    with its size and SHA-256, so a resume can prove the folder whole; then drop the oldest beyond ``keep``."""
    d = round_dir(run_dir, server_round)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(d.iterdir()) if p.is_file() and p.suffix == ".pt"}
    from .files import atomic_write_text

    atomic_write_text(d / COMPLETE, json.dumps({"format": FORMAT, "round": server_round, "files": files}, indent=1))
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoint_root(run_dir).glob("round-*"):
        if not (partial / COMPLETE).exists() and partial != d and _round_of(partial) < server_round:
            shutil.rmtree(partial, ignore_errors=True)


def _round_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("round-*") if (p / COMPLETE).exists()), key=_round_of)


def latest(run_dir: Path) -> Path | None:
    """The newest sealed checkpoint that proves whole; a damaged one is passed over with a warning."""
    sealed = complete_checkpoints(run_dir)
    for i, ckpt in reversed(list(enumerate(sealed))):
        problems = verify(ckpt)
        if not problems:
            return ckpt
        msg = (f"checkpoint {ckpt} is damaged ({'; '.join(problems[:3])}): "
               + ("trying the one before it" if i else "it was the oldest one kept"))
        log.warning(msg)
        print(f"  WARNING: {msg}", flush=True)
    return None


def verify(ckpt: Path) -> list[str]:
    """What is wrong with a sealed checkpoint folder: files missing, of another size or content."""
    try:
        seal = json.loads((ckpt / COMPLETE).read_text())
        files = seal["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"its {COMPLETE} marker lists no files (written by an older version, or damaged)"]
    problems = []
    for name, want in files.items():
        p = ckpt / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{name} has {p.stat().st_size} bytes, sealed with {want['size']}")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{name} differs from what was sealed (SHA-256)")
    if "meta.pt" not in files:
        problems.append("meta.pt was not sealed")
    return problems


def load_meta(ckpt: Path) -> dict[str, Any]:
    try:
        meta = torch.load(ckpt / "meta.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint is the user's to see
        raise ConfigError(f"resume: cannot read {ckpt / 'meta.pt'} ({type(exc).__name__}: {exc}). "
                          "Fix: delete that checkpoint folder to resume from an older one, or set resume=never.") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"resume: {ckpt} has checkpoint format {meta.get('format')!r}, this version reads {FORMAT}. "
                          "Fix: resume with the version that wrote it, or set resume=never.")
    return meta


def load_clients(ckpt: Path) -> dict[str, dict[str, Any]]:
    """Every client's persistent state in a checkpoint, by client name (all ranks' shards)."""
    out: dict[str, dict[str, Any]] = {}
    for shard in sorted(ckpt.glob("clients-rank*.pt")):
        try:
            out.update(torch.load(shard, map_location="cpu", weights_only=True)["clients"])
        except Exception as exc:  # noqa: BLE001 - a damaged shard is the user's to see
            raise ConfigError(f"resume: cannot read {shard} ({type(exc).__name__}: {str(exc)[:200]}). Fix: delete "
                              "that checkpoint folder to resume from an older one, or set resume=never.") from None
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ in a way that would change the run's result."""
    a, b = _flatten(saved), _flatten(current)
    bad = []
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in RESUMABLE_DIFFERENCES):
            continue
        if a.get(key) != b.get(key):
            bad.append(f"{key}: checkpoint {a.get(key)!r}, now {b.get(key)!r}")
    return bad


MANIFEST = "data_manifest.json"


def data_manifest(task) -> dict[str, list]:
    """Every image the run uses: ``path -> [size, mtime_ns, label, where]`` (``client/split`` or
    ``unseen/domain``): what a resumed run must find unchanged."""
    out: dict[str, list] = {}

    def add(samples, where: str) -> None:
        for s in samples:
            st = os.stat(s.path)
            out[s.path] = [st.st_size, st.st_mtime_ns, s.label, where]

    for c in task.clients:
        for split in ("train", "val", "test"):
            add(getattr(c, split), f"{c.name}/{split}")
    for name, samples in task.unseen.items():
        add(samples, f"unseen/{name}")
    return out


def manifest_digest(manifest: dict[str, list]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def data_changes(old: dict[str, list], new: dict[str, list]) -> list[str]:
    """What differs between two manifests, one phrase per image."""
    out = [f"added {p}" for p in sorted(set(new) - set(old))]
    out += [f"removed {p}" for p in sorted(set(old) - set(new))]
    for p in sorted(set(old) & set(new)):
        (s0, m0, l0, w0), (s1, m1, l1, w1) = old[p], new[p]
        if p.startswith("node "):  # a deployment's node: [digest of its images, of its weights, 0, its kind]
            out += [f"{p}: its images changed"] * (s0 != s1) + [f"{p}: its backbone weights changed"] * (m0 != m1)
            out += [f"{p}: was {w0}, is {w1}"] * (w0 != w1)
        elif (s0, m0) != (s1, m1):
            out.append(f"modified {p} (size {s0} -> {s1})")
        elif w0 != w1:
            out.append(f"moved {p} ({w0} -> {w1})")
        elif l0 != l1:
            out.append(f"relabelled {p} (label {l0} -> {l1})")
    return out


def check_data(ckpt: Path, meta: dict[str, Any], run_dir: Path, manifest: dict[str, list]) -> None:
    """Refuse to resume when the images (or the split they make) differ from the checkpoint's."""
    saved = meta.get("data_digest")
    if saved == manifest_digest(manifest):
        return
    if saved is None:
        raise ConfigError(f"resume: {ckpt} does not record the data it was trained on, so a resume cannot be "
                          "checked. Fix: start over with resume=never (or another run_name).")
    try:
        changes = data_changes(json.loads((run_dir / MANIFEST).read_text()), manifest)
    except (OSError, ValueError):
        changes = ["(the run's data_manifest.json is missing, so what changed cannot be listed)"]
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise ConfigError(f"resume: the images differ from those the checkpoint {ckpt} was trained on: {shown}. "
                      "A resumed run would mix the old split with the new data. Fix: restore the data set as it "
                      "was, or start over with resume=never (or another run_name).")


def rounds_dependent(config: dict[str, Any]) -> list[str]:
    """What in a run's config is derived from ``federation.rounds`` (a resume may not change it)."""
    out = []
    if (config.get("algorithm") or {}).get("lr_schedule") == "cosine":
        out.append("algorithm.lr_schedule=cosine spreads the learning rate over federation.rounds")
    if ((config.get("federation") or {}).get("privacy") or {}).get("target_epsilon") is not None:
        out.append("federation.privacy.target_epsilon chose the noise for federation.rounds rounds")
    return out


def check_resumable(ckpt: Path, meta: dict[str, Any], current_config: dict[str, Any]) -> None:
    saved = json.loads(meta["config"])
    before, now = saved["federation"]["rounds"], current_config["federation"]["rounds"]
    if int(meta["round"]) > now:
        raise ConfigError(f"resume: the checkpoint {ckpt} is at round {meta['round']}, past federation.rounds={now}. "
                          f"Fix: resume with federation.rounds={before} (the run's own), or start a new run "
                          "(another run_name, or resume=never).")
    planned = rounds_dependent(saved) if now != before else []
    if planned:
        raise ConfigError(f"resume: federation.rounds={now}, but the checkpoint {ckpt} belongs to a run of {before} "
                          f"rounds and {'; '.join(planned)}: the resumed run would match neither. "
                          f"Fix: resume with federation.rounds={before}, or start a new run of {now} rounds "
                          "(another run_name, or resume=never).")
    diff = config_mismatch(saved, current_config)
    if diff:
        shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise ConfigError(f"resume: the checkpoint {ckpt} was written with another config ({shown}). "
                          "Fix: resume with the same settings, or start a new run (another run_name, or resume=never).")


def write_checkpoint(fabric, run_dir: Path, server_round: int, keep: int, meta: dict[str, Any] | None,
                     clients: dict[str, dict[str, Any]], writer: "CheckpointWriter | None" = None,
                     wait: bool = True) -> None:
    """Every rank writes its clients' persistent state; rank 0 the ``meta``; then the folder is sealed.

    A single process hands the writing to ``writer`` (off the round loop) unless told to ``wait``, or
    its clients keep Adam state: that lives in place and changes in the next round, so it is written
    before the loop goes on. Several processes write in the loop: the seal comes after a barrier.
    """
    if writer is not None:
        writer.wait()
        in_place = any(c.get("optimizer_state") is not None for c in clients.values())
        if fabric.world_size == 1 and not wait and not in_place:
            def write() -> None:
                save_client_shard(run_dir, server_round, 0, clients)
                save_meta(run_dir, server_round, meta)
                mark_complete(run_dir, server_round, keep)

            writer.submit(write)
            return
    save_client_shard(run_dir, server_round, fabric.global_rank, clients)
    if meta is not None:
        save_meta(run_dir, server_round, meta)
    fabric.barrier()
    if fabric.is_global_zero:
        mark_complete(run_dir, server_round, keep)


class CheckpointWriter:
    """Writes a checkpoint in a background thread while the next round trains.

    Serialising, fsyncing and renaming cost milliseconds a round, as much as a
    FedCLIP round's evaluation on cached features. One write is in flight at
    most: the next checkpoint waits for the previous one, and so do the end of
    the run and a preemption; an error in the writer is raised at that wait.
    """

    def __init__(self):
        self._pool = None
        self._pending = None

    def submit(self, fn) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = self._pool.submit(fn)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Let a write in flight finish (its error, if any, is logged: the run is ending anyway)."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001
            log.warning("writing the last checkpoint failed: %s", exc)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
