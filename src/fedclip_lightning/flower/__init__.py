"""FedCLIP across institutions: the same server loop with its clients on Flower SuperNodes.

* ``node.py``: a site's client, built from the run's hyperparameters and the node's own settings (no Flower);
* ``client_app.py`` / ``server_app.py``: the ClientApp and ServerApp (``app/pyproject.toml`` names them);
* ``transport.py``: the server's transport over a Flower Grid; ``grid.py``: a Grid in one process.

Needs the ``[flower]`` extra (``pip install 'fedclip-lightning[flower]'``, Python >= 3.11). README: "Across
institutions".
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"  # `flwr run <APP_DIR> <connection>`
