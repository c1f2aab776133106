"""The ServerApp: the project's own run (``federation.orchestrator.run``) with its clients on SuperNodes.

Its run config (``flwr run <app> <connection> --run-config '...'``; the keys are in ``app/pyproject.toml``):

* ``overrides``: the run's Hydra overrides, as on the command line (``"algorithm=fedclip federation.rounds=20"``);
  the server keeps its own settings (output_dir, logger, resume...), the nodes get the hyperparameters;
* ``weights``: the server's own CLIP weights (a pretrained tag or a file on the server) when not the preset's;
* ``min-nodes``: wait for this many SuperNodes before the first round (at most ``node-wait`` seconds);
* ``round-timeout``: seconds a round waits for its replies; a client that has not answered by then is
  counted as dropped out of the round.
"""

from __future__ import annotations

import shlex
import sys

import torch  # noqa: F401  (ArrayRecord's torch conversions look torch up in sys.modules)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import UserError
from .transport import FlowerClients

app = ServerApp()


def serve(grid: Grid, run_config: dict) -> dict:
    """Run the configured experiment over ``grid``; its summary."""
    from ..configure import load_config
    from ..federation.orchestrator import run

    overrides = shlex.split(str(run_config.get("overrides", "")))
    server = list(overrides)
    if run_config.get("weights"):
        server.append(f"backbone.pretrained={run_config['weights']}")
    clients = FlowerClients(grid, overrides, min_nodes=int(run_config.get("min-nodes", 1)),
                            round_timeout=float(run_config.get("round-timeout", 600.0)),
                            node_wait=float(run_config.get("node-wait", 300.0)))
    return run(load_config(server), remote=clients)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        serve(grid, dict(context.run_config))
    except UserError as exc:  # the user's mistake: its message, no traceback
        print(f"fedclip-lightning: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
