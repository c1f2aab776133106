"""Read back what a W&B run logged in offline mode (``WANDB_MODE=offline``).

The trainer uses it on resume (which rounds did the earlier sessions of this W&B
run already log?) and the tests use it to check what a run leaves behind.

An offline run lives in ``<dir>/wandb/offline-run-<time>-<id>/`` and its data is
in ``run-<id>.wandb``: a LevelDB-style log (https://github.com/google/leveldb/
blob/master/doc/log_format.md) of serialized ``wandb.proto.wandb_internal_pb2.Record``
messages.  The installed wandb (0.31) ships no Python reader for it (the old
``wandb.sdk.internal.datastore`` is gone; ``wandb sync`` is done by the Go
``wandb-core`` binary), so the ~30 lines of framing are decoded here and each
payload is parsed with the installed protobuf ``Record`` class.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

_HEADER = struct.Struct("<4sHB")  # ident b":W&B", magic 0xBEE1, version 0
_REC = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_offline_runs(wandb_dir: Path) -> list[Path]:
    """Every ``offline-run-*`` directory under ``wandb_dir`` (recursive), oldest first."""
    found = {p.resolve() for p in Path(wandb_dir).rglob("offline-run-*") if p.is_dir()}
    return sorted(found, key=lambda p: p.name)


def _iter_payloads(path: Path) -> Iterator[bytes]:
    """Yield the raw record payloads of a ``.wandb`` file (stops at a torn tail)."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:  # not yet written
        return
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path} is not a wandb transaction log")
    pos, parts = _HEADER.size, []
    while pos + _REC.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _REC.size:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, rtype = _REC.unpack_from(data, pos)
        start = pos + _REC.size
        chunk = data[start : start + length]
        if rtype == 0 and length == 0 and crc == 0:  # zero padding
            pos += left_in_block
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) & 0xFFFFFFFF != crc:
            break  # truncated / being written: keep what we have
        pos = start + length
        if rtype == _FULL:
            yield chunk
        elif rtype == _FIRST:
            parts = [chunk]
        elif rtype == _MIDDLE:
            parts.append(chunk)
        elif rtype == _LAST:
            parts.append(chunk)
            yield b"".join(parts)
            parts = []


def iter_records(path: Path) -> Iterator[Any]:
    """Yield ``wandb_internal_pb2.Record`` messages from a ``run-*.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        yield rec


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _value(item: Any) -> Any:
    """Decode a Config/Summary/HistoryItem value (typed oneof or ``value_json``)."""
    case = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if case == "none":
        return None
    if case == "json":
        return json.loads(item.json)
    if case is not None:
        return getattr(item, case)
    return json.loads(item.value_json) if item.value_json else None


def _metric_summary(summary: Any) -> list[str]:
    return [f.name for f in summary.DESCRIPTOR.fields if f.type == f.TYPE_BOOL and getattr(summary, f.name)]


def _unwrap(cfg: dict) -> dict:
    """Turn config.yaml-style ``{"k": {"value": v, "desc": ...}}`` into ``{"k": v}``."""
    return {
        k: v["value"] if isinstance(v, dict) and "value" in v else v
        for k, v in cfg.items()
        if k != "_wandb"
    }


def read_offline_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    out: dict[str, Any] = dict(
        id=None, name=None, group=None, job_type=None, project=None, tags=[],
        config={}, history=[], summary={}, exit_code=None, metrics={}, artifacts=[],
    )  # fmt: skip
    files = sorted(run_dir.glob("run-*.wandb"))
    for rec in iter_records(files[0]) if files else ():
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(
                id=r.run_id, name=r.display_name, group=r.run_group, job_type=r.job_type,
                project=r.project, tags=list(r.tags),
            )  # fmt: skip
            for it in r.config.update:
                out["config"][_key(it)] = _value(it)
            for it in r.summary.update:
                out["summary"][_key(it)] = _value(it)
        elif kind == "config":
            for it in rec.config.update:
                out["config"][_key(it)] = _value(it)
            for it in rec.config.remove:
                out["config"].pop(_key(it), None)
        elif kind == "history":
            row = {_key(it): _value(it) for it in rec.history.item}
            row.setdefault("_step", rec.history.step.num)
            out["history"].append(row)
        elif kind == "summary":
            for it in rec.summary.update:
                out["summary"][_key(it)] = _value(it)
            for it in rec.summary.remove:
                out["summary"].pop(_key(it), None)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
        elif kind == "metric":
            m = rec.metric
            out["metrics"][m.name or m.glob_name] = {
                "step_metric": m.step_metric, "summary": _metric_summary(m.summary),
            }  # fmt: skip
        elif kind == "artifact":
            a = rec.artifact
            out["artifacts"].append(dict(
                name=a.name, type=a.type, aliases=list(a.aliases), digest=a.digest,
                metadata=json.loads(a.metadata) if a.metadata else {},
                files=sorted(e.path for e in a.manifest.contents),
            ))  # fmt: skip
    if out["id"] is None and "-" in run_dir.name:  # a session killed before W&B wrote its run record
        out["id"] = run_dir.name.rsplit("-", 1)[1]
    out["config"].pop("_wandb", None)
    out["summary"].pop("_wandb/runtime", None)
    # Fallbacks (written by online runs / older wandb; offline 0.31 writes neither).
    summary_json = run_dir / "files" / "wandb-summary.json"
    if not out["summary"] and summary_json.exists():
        out["summary"] = json.loads(summary_json.read_text())
    config_yaml = run_dir / "files" / "config.yaml"
    if not out["config"] and config_yaml.exists():
        import yaml

        out["config"] = _unwrap(yaml.safe_load(config_yaml.read_text()) or {})
    return out


def runs_of(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline directories of one W&B run id (a resumed run has one per session), oldest first."""
    return [p for p in find_offline_runs(wandb_dir) if p.name.endswith(f"-{run_id}")]


def logged_rounds(wandb_dir: Path, run_id: str, but: Path | None = None) -> set[int]:
    """The rounds that the offline sessions of run ``run_id`` (except the directory ``but``) hold in
    their history; a torn tail after a SIGKILL is left out, so those rounds are logged again."""
    rounds: set[int] = set()
    for d in runs_of(wandb_dir, run_id):
        if but is not None and d == Path(but).resolve():
            continue
        try:
            rounds.update(int(r["round"]) for r in read_offline_run(d)["history"] if r.get("round") is not None)
        except (OSError, ValueError):  # an unreadable session: its rounds are logged again
            continue
    return rounds
