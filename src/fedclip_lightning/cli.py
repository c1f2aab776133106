"""Command line: ``fedclip-lightning [--print-config] key=value ...``.

Overrides are Hydra's (``federation.rounds=5``, ``data=pacs``,
``experiment=pacs_paper``). A user mistake prints one message and exits with
status 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from .errors import UserError, quiet_on_closed_pipe

USAGE = """\
usage: fedclip-lightning [--print-config] [key=value ...]

Runs federated CLIP training as configured by conf/ (Hydra). With no
arguments: the embedded demo (synthetic data, the small pretrained CLIP that
ships in the package, FedCLIP for 200 rounds, CPU).

examples:
  fedclip-lightning                                   # the demo
  fedclip-lightning experiment=pacs_mini_debug        # 40 real PACS images, tiny backbone
  fedclip-lightning experiment=pacs_paper data.root=/data/PACS data.unseen=[sketch]
  fedclip-lightning algorithm=zeroshot backbone=vit_b32_openai data=pacs data.root=/data/PACS
  fedclip-lightning fabric.devices=2 federation.rounds=20 logger=csv

presets:
{presets}
options:
  --print-config   print the composed config and exit
  -h, --help       this message
"""


def _presets() -> str:
    from .config import conf_dir  # not configure: --help needs no torch

    try:
        root = conf_dir()
    except UserError:
        return "  (config folder not found)\n"
    lines = []
    for group in sorted(p for p in root.iterdir() if p.is_dir()):
        names = sorted(f.stem for f in group.glob("*.yaml"))
        lines.append(f"  {group.name + '=':12} {' | '.join(names)}")
    return "\n".join(lines) + "\n"


def _quiet() -> None:
    """Keep the console for what matters: our header, the progress bar, the table."""
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning.*")
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
    # launch.sh starts SLURM runs with srun; a local run on a SLURM login node is not a mistake.
    warnings.filterwarnings("ignore", message=r".*`srun` command is available on your system.*")
    for name in ("lightning", "lightning.fabric", "lightning.pytorch", "wandb"):
        logging.getLogger(name).setLevel(logging.WARNING)
    _log_format()


def _log_format() -> None:
    """Log lines that a cluster's output files can be read by: a timestamp and the process's rank in each.
    Rank 0 logs warnings and up (and our own INFO); other ranks only errors, unless
    FEDCLIP_LOG_LEVEL=DEBUG, which every rank then follows."""
    rank = next((os.environ[v] for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK") if os.environ.get(v)), "0")
    level = os.environ.get("FEDCLIP_LOG_LEVEL", "").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                           "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        root.setLevel(level)
    else:
        root.setLevel(logging.WARNING if rank == "0" else logging.ERROR)


def _user_message(exc: UserError) -> str:
    text = str(exc)
    # An error raised in a DataLoader worker comes back wrapped with its traceback text.
    m = re.search(r"Original Traceback.*\n.*?(\w+Error: .*)\Z", text, flags=re.S)
    return m.group(1) if m else text


def _peer_failed(exc: BaseException) -> bool:
    """A collective broke because another rank exited (gloo or NCCL)."""
    text = str(exc)
    return any(m in text for m in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator",
                                   "ProcessGroupNCCL", "Broken pipe"))


def _is_rank_zero() -> bool:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") != "0":
            return False
    return True


def _disk_message(exc: OSError) -> str | None:
    """One message for a disk that is full, read-only or not ours: the path, what is free, the fix."""
    import errno
    import shutil
    from pathlib import Path

    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    # The first write that failed is the one to name (writing summary.json afterwards may fail too); where
    # that error names no file (a buffered flush inside torch.save), the file of the write it broke.
    chain, seen = [exc], set()
    while chain[-1].__context__ is not None and id(chain[-1].__context__) not in seen:
        seen.add(id(chain[-1].__context__))
        if isinstance(chain[-1].__context__, OSError) and chain[-1].__context__.errno == exc.errno:
            chain.append(chain[-1].__context__)
        else:
            break
    exc = chain[-1]
    path = next((e.filename for e in reversed(chain) if e.filename), None) or "?"
    where = Path(path).parent if path != "?" else Path(".")
    try:
        free = f"{shutil.disk_usage(where).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}.get(exc.errno, "permission denied")
    return (f"cannot write {path}: {what} ({free}). The run stopped there; its last complete checkpoint is "
            "intact and summary.json says failed where it could be written. Fix: free space (or use a writable "
            "folder) for output_dir / features.dir, then rerun with resume=auto.")


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    from .signals import install_early

    install_early()  # before the seconds of importing torch: a SLURM warning then is kept, not fatal
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(presets=_presets()))
        return 0
    flags = [a for a in argv if a.startswith("-")]
    unknown = [f for f in flags if f != "--print-config"]
    if unknown:
        print(f"fedclip-lightning: unknown option {unknown[0]!r}. Fix: see `fedclip-lightning --help`; "
              "settings are passed as key=value.", file=sys.stderr)
        return 2
    overrides = [a for a in argv if not a.startswith("-")]
    from .numerics import NumericsError, apply_switch

    try:
        apply_switch()  # FEDCLIP_NUMERICS=portable: its variables must be set before torch is imported
    except NumericsError as exc:
        print(f"fedclip-lightning: {exc}", file=sys.stderr)
        return 2
    _quiet()
    try:
        from .config import to_dict
        from .configure import load_config

        cfg = load_config(overrides)
        if "--print-config" in flags:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(to_dict(cfg)))
            return 0
        from .federation.orchestrator import Preempted, run

        try:
            run(cfg)
        except Preempted as exc:
            if _is_rank_zero():
                print(f"fedclip-lightning: {exc}", file=sys.stderr)
            return 3
    except UserError as exc:
        from .federation import orchestrator

        # Before launch every process meets the same mistake, and one says it; after launch a
        # mistake may be one rank's own (an unreadable image of its client), so each says its own.
        if orchestrator.LAUNCHED_RANK is not None:
            print(f"fedclip-lightning [rank {orchestrator.LAUNCHED_RANK}]: {_user_message(exc)}", file=sys.stderr)
        elif _is_rank_zero():
            print(f"fedclip-lightning: {_user_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = _disk_message(exc)
        if message is None:
            raise
        print(f"fedclip-lightning: {message}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if not _peer_failed(exc):
            raise
        print("fedclip-lightning: another process of this run stopped (its message is above, unless it was killed "
              "without one: out of memory, kill -9, a lost node); this one stopped with it. Fix: see that process's "
              "message or the job's log, then rerun with resume=auto.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedclip-lightning: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
