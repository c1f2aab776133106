"""What travels between the ServerApp and a ClientApp: a request (``ConfigRecord`` "run"), the server's
state (``ArrayRecord`` "state", bitwise), and the replies. Kept in one place so both sides agree."""

from __future__ import annotations

import torch  # noqa: F401  (ArrayRecord's torch conversions look torch up in sys.modules)
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from .node import Request

HELLO = "query.hello"


def request_record(req: Request, evaluate_with: str = "") -> ConfigRecord:
    return ConfigRecord({"overrides": list(req.overrides), "run-uid": req.run_uid, "round": int(req.server_round),
                         "kind": req.kind, "classes": list(req.classes), "keep-from": int(req.keep_from),
                         "state-round": int(req.state_round), "evaluate-with": evaluate_with})


def read_request(msg: Message) -> tuple[Request, str]:
    r = msg.content.config_records["run"]
    return Request(overrides=[str(o) for o in r["overrides"]], run_uid=str(r["run-uid"]), server_round=int(r["round"]),
                   kind=str(r["kind"]), classes=[str(c) for c in r["classes"]], keep_from=int(r["keep-from"]),
                   state_round=int(r["state-round"])), \
        str(r["evaluate-with"])


def content(req: Request, state: dict[str, torch.Tensor] | None = None, evaluate_with: str = "") -> RecordDict:
    rd = RecordDict({"run": request_record(req, evaluate_with)})
    if state:
        rd["state"] = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})
    return rd


def read_state(msg: Message) -> dict[str, torch.Tensor]:
    arrays = msg.content.array_records
    return dict(arrays["state"].to_torch_state_dict()) if "state" in arrays else {}


def identity_record(identity: dict) -> ConfigRecord:
    return ConfigRecord({k: str(v) for k, v in identity.items()})


def hello_reply(msg: Message, info: dict) -> Message:
    rec = {"client": info["client"], "data-digest": info["data-digest"], "weights": info["weights"],
           "classes": list(info["classes"]), "sizes": [int(x) for x in info["sizes"]]}
    return Message(RecordDict({"hello": ConfigRecord(rec)}), reply_to=msg)


def fit_reply(msg: Message, train: dict, update: dict, num_examples: int, identity: dict) -> Message:
    rd = RecordDict({"train": MetricRecord({"accuracy": float(train["accuracy"]), "loss": float(train["loss"]),
                                            "n": int(train["n"]), "num-examples": int(num_examples)}),
                     "node": identity_record(identity)})
    if update:
        rd["update"] = ArrayRecord(update)
    return Message(rd, reply_to=msg)


def evaluate_reply(msg: Message, slots: dict[str, list[float]], identity: dict) -> Message:
    rd = RecordDict({"slots": ArrayRecord({k: torch.tensor(v, dtype=torch.float64) for k, v in slots.items()}),
                     "node": identity_record(identity)})
    return Message(rd, reply_to=msg)
