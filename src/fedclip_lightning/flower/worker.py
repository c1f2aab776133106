"""A warm SuperExec for a SuperNode: ``python -m fedclip_lightning.flower worker <flower-superexec's arguments>``.

Flower 1.42 runs every message in a new ``flwr-clientapp`` process, which imports Python's, torch's and this
package's modules afresh: 5-8 s a message on 2 cores, before any work. This worker is ``flower-superexec``
with one change: it imports all that once, and runs each ClientApp task in a fork of itself (Flower's own
``run_clientapp``, the same messages, state and replies), so a message starts in milliseconds. Use it with
a SuperNode in process isolation:

    flower-supernode --isolation process --port 9094 ...          # the node does not start its own SuperExec
    python -m fedclip_lightning.flower worker --insecure --runtime-api-address 127.0.0.1:9094

POSIX only (``os.fork``). The parent never runs torch, so its children start from a clean thread pool.
"""

from __future__ import annotations

import os


class ForkExecutor:
    """Flower's subprocess executor, but a ClientApp task runs in a fork of this warm process."""

    def __init__(self):
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.cold, self.children = SubprocessExecutor(), set()

    def get_eligible_capacity(self, supported_task_types, **kw):
        return self.cold.get_eligible_capacity(supported_task_types, **kw)

    def wait_for_capacity(self, *a, **kw) -> None:
        return self.cold.wait_for_capacity(*a, **kw)

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.cold.launch(spec)
        pid = os.fork()
        if pid == 0:  # the child: one task, then exit without returning into the parent's loop
            code = 1
            try:
                from flwr.supernode.runtime.run_clientapp import run_clientapp

                certificates = None
                if spec.root_certificates_path:
                    with open(spec.root_certificates_path, "rb") as f:
                        certificates = f.read()
                run_clientapp(spec.runtime_api_address, spec.token, spec.insecure, certificates,
                              spec.parent_pid, spec.runtime_dependency_install)
                code = 0
            except SystemExit as exc:  # flwr_exit's way out
                code = exc.code if isinstance(exc.code, int) else 0
            finally:
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.cold.close()


def main(argv: list[str]) -> int:
    import sys

    # The imports a ClientApp message needs, paid once.
    import torch  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec as rs

    from ..federation import orchestrator  # noqa: F401  (lightning, open_clip, the algorithms)
    from . import client_app  # noqa: F401
    from ..configure import load_config

    load_config([])  # Hydra's own first-use cost
    cold = rs.get_executor

    def get_executor(executor_type, *a, **kw):
        return ForkExecutor() if executor_type == rs.ExecutorType.SUBPROCESS else cold(executor_type, *a, **kw)

    rs.get_executor = get_executor
    sys.argv = ["flower-superexec", *argv]
    flower_superexec()
    return 0
