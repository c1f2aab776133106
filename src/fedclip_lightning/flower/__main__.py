"""``python -m fedclip_lightning.flower app``: the path of the Flower app folder to give ``flwr run``;
``python -m fedclip_lightning.flower keys ...``: TLS certificates and SuperNode keys (``keys.py``);
``python -m fedclip_lightning.flower worker ...``: a warm SuperExec for a SuperNode (``worker.py``)."""

import sys

from . import APP_DIR


def main(argv: list[str]) -> int:
    if argv[:1] == ["app"]:
        print(APP_DIR)
        return 0
    if argv[:1] == ["worker"]:
        from .worker import main as worker

        return worker(argv[1:])
    if argv[:1] == ["keys"]:
        from .keys import main as keys

        return keys(argv[1:])
    print("usage: python -m fedclip_lightning.flower app | keys FOLDER [--host H] [--nodes N ...] | "
          "worker <flower-superexec arguments>", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
