"""A Flower ``Grid`` in one process: the real ClientApp answers each message at once, through Flower's own
serialisation (what travels is what a SuperLink would carry), with one ``Context`` per node. For tests and
for trying a deployment's code on one machine without a SuperLink; ``dead`` makes a node stop answering."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def _wire_copy(msg: Message) -> Message:
    """The message as the other side receives it (deflated and inflated, as on the wire)."""
    msg_id = msg.metadata.message_id
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    out = inflate_object_from_contents(msg.object_id, contents)
    out.metadata.__dict__["_message_id"] = msg_id
    return out


class InProcessGrid(Grid):
    """``node_configs``: ``{node id: its --node-config}``; ``client_app``: the ClientApp every node runs."""

    def __init__(self, client_app, node_configs: dict[int, dict], run_config: dict | None = None, run_id: int = 1):
        self._client_app = client_app
        self._run = Run.create_empty(run_id)
        self._contexts = {nid: Context(run_id=run_id, node_id=nid, node_config=dict(cfg), state=RecordDict(),
                                       run_config=dict(run_config or {})) for nid, cfg in node_configs.items()}
        self._replies: dict[str, Message] = {}
        self.dead: set[int] = set()
        self.sent: list[Message] = []  # every message pushed, as the nodes received it
        # Building a Message needs the run's identity (flwr-serverapp sets it in a deployment).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._contexts if n not in self.dead]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as HttpGrid does
            ids.append(msg.metadata.message_id)
            received = _wire_copy(msg)
            self.sent.append(received)
            reply = self._execute(received)
            if reply is not None:
                reply.metadata.__dict__["_message_id"] = reply.object_id
                self._replies[msg.metadata.message_id] = _wire_copy(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies[i] for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _execute(self, msg: Message) -> Message | None:
        dst = msg.metadata.dst_node_id
        if dst in self.dead or dst not in self._contexts:
            return None
        try:
            return self._client_app(msg, self._contexts[dst])
        except Exception as ex:  # as flwr-clientapp replies
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                           reply_to=msg)
