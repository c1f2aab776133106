"""The ClientApp a SuperNode runs: each message is answered by the node's ``Node`` (node.py), built from the
run's overrides (in the message) and the node's own settings (``--node-config``)."""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord's torch conversions look torch up in sys.modules)
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from . import messages
from .node import Node

app = ClientApp()


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    req, _ = messages.read_request(msg)
    return messages.hello_reply(msg, Node(context.node_config).hello(req))


@app.train()
def train(msg: Message, context: Context) -> Message:
    req, _ = messages.read_request(msg)
    result, update, num_examples, identity = Node(context.node_config).fit(req, messages.read_state(msg))
    return messages.fit_reply(msg, result, update, num_examples, identity)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    req, evaluate_with = messages.read_request(msg)
    slots, identity = Node(context.node_config).evaluate(req, messages.read_state(msg), evaluate_with)
    return messages.evaluate_reply(msg, slots, identity)
