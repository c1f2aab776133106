"""A sweep's results: its tables and plots from what its runs left, and their copy on W&B.

Both the local sweep (``sweep.py``) and its SLURM table job (``slurm.py``) end here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError

PLAN = "sweep.json"


def report(sweep_dir: Path) -> str:
    """Write the tables and plots of a sweep directory (and log them to W&B, as the sweep's runs are);
    return the Markdown of the selected-round table."""
    from .plots import plot_sweep
    from .tables import left_out_runs, write_sweep_tables

    paths = write_sweep_tables(sweep_dir)
    paths += plot_sweep(sweep_dir)
    md = (sweep_dir / "table_selected.md").read_text()
    others = left_out_runs(sweep_dir)
    if others:
        md += (f"\nleft out of the tables: {len(others)} run(s) of an earlier plan in this folder ({', '.join(others[:5])}"
               f"{', ...' if len(others) > 5 else ''}); sweep.json lists this sweep's runs\n")
    try:
        where = log_to_wandb(sweep_dir, paths)
    except Exception as exc:  # noqa: BLE001 - the tables are written; W&B (a node without network...) is a copy
        where = f"\nW&B: could not log the tables ({type(exc).__name__}: {exc}); they are in {sweep_dir}"
    return md + "\nwritten: " + ", ".join(str(p.relative_to(sweep_dir.parent)) for p in paths) + where


def log_to_wandb(sweep_dir: Path, paths: list[Path]) -> str:
    """The tables and plots as an artifact (type ``sweep-results``) of a W&B run in the sweep's group."""
    from .config import WandbConfig
    from .loggers import wandb_mode_of

    try:
        plan = json.loads((sweep_dir / PLAN).read_text())
        if "logger" in plan:  # the sweep's logger settings, as the sweep composed them
            logger, w = plan["logger"]["name"], WandbConfig(**plan["logger"]["wandb"])
        else:  # a sweep.json from before they were kept there: compose them (imports the package, torch)
            from .configure import load_config

            cfg = load_config(plan["overrides"])
            logger, w = cfg.logger.name, cfg.logger.wandb
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return ""  # a sweep directory from before sweep.json: its runs say where W&B is
    mode = wandb_mode_of(w.mode)
    if logger != "wandb" or mode == "disabled":
        return ""
    import wandb

    name = sweep_dir.name
    if wandb.run is not None:
        wandb.finish()
    run = wandb.init(project=w.project, entity=w.entity, group=name, job_type="sweep", name=f"{name}-tables",
                     id=plan["wandb_id"], resume="allow", dir=str(sweep_dir), mode=mode,
                     config={"runs": plan["runs"], "overrides": plan["overrides"]})
    try:
        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "-", f"sweep-{name}"), type="sweep-results",
                             metadata={"runs": plan["runs"], "overrides": plan["overrides"]})
        logged = {}
        for p in paths:
            art.add_file(str(p), name=str(p.relative_to(sweep_dir)))
            if p.suffix == ".png" and p.parent == sweep_dir:
                logged[p.stem] = wandb.Image(str(p))
            elif p.suffix == ".csv":
                import csv

                with open(p, newline="") as f:
                    rows = list(csv.reader(f))
                logged[p.stem] = wandb.Table(columns=rows[0], data=rows[1:])
        run.log(logged)
        run.log_artifact(art)
    finally:
        run.finish()
    return f"\nW&B: run {name}-tables in group {name} ({mode}), artifact {art.name}"
