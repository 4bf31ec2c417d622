"""The demo's gateway part: the OpenAI-compatible API and the dashboard in front of the demo mesh.

:func:`start_gateway` serves the gateway on its own thread (``--gateway-port``, 8000 by
default, any free port if that one is taken), with the committee's credit behind an API key
made for the demo (``DATA_DIR/gateway/keys.json``), and prints how to point the ``openai``
package at it. :func:`gateway_round` then asks it once plainly and once streamed, over
HTTP exactly as an OpenAI client does, so the answers come from the mesh's workers through
the overlay. With ``--serve`` the gateway stays up with the mesh.

Who calls it: :mod:`permamesh.demo.run`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from permamesh.demo import enroll
from permamesh.directory.announce import advertised, announce
from permamesh.gateway.accounts import KeyRing
from permamesh.gateway.errors import GatewayError
from permamesh.gateway.openai_api import post_chat
from permamesh.gateway.process import build_gateway
from permamesh.gateway.server import GatewayThread
from permamesh.identity import NodeIdentity
from permamesh.ops.metrics import MetricsRecord, register_metrics, unregister_metrics

GATEWAY_NAME = "demo-gateway"  # its key's name under DATA_DIR/keys

log = logging.getLogger(__name__)


def start_gateway(data_dir: Path, net, client, port: int, say) -> tuple[GatewayThread, str, str]:
    """The demo's gateway, with a descriptor in the committee's directory like any node: the
    seed partner registers its key, and it announces its address once it listens."""
    key = KeyRing(data_dir).new_key("demo")
    identity = NodeIdentity.load_or_create(Path(data_dir) / "keys", GATEWAY_NAME)
    enroll.register_nodes(net, client, data_dir, [], [], "", gateways=[GATEWAY_NAME])
    for attempt in (port, 0) if port else (0,):
        thread = GatewayThread(build_gateway(data_dir, port=attempt, committee=tuple(net.endpoints), timeout_s=120.0,
                                             identity=identity))
        try:
            url = thread.start()
            break
        except GatewayError as exc:
            log.info("gateway on port %d: %s; trying any free port", attempt, exc)
    else:  # pragma: no cover - port 0 always binds on loopback
        raise GatewayError("the gateway could not listen")
    announce(identity, net.endpoints, advertised("tcp://" + url.removeprefix("http://"), None))
    register_metrics(data_dir, MetricsRecord(identity.node_id, "gateway", url + "/metrics"))
    say(f"\n== the OpenAI-compatible gateway: {url}/v1 (dashboard {url}/dashboard, metrics {url}/metrics) ==")
    say(f"  api key: {key}   (made for this demo; `permamesh gateway --new-key NAME` makes more)")
    say(f'  from openai import OpenAI; client = OpenAI(base_url="{url}/v1", api_key="{key}")')
    return thread, url, key


def stop_gateway(thread: GatewayThread, data_dir: Path) -> None:
    unregister_metrics(data_dir, NodeIdentity.load_or_create(Path(data_dir) / "keys", GATEWAY_NAME).node_id)
    thread.stop()


def gateway_round(url: str, key: str, model: str, max_tokens: int, say) -> None:
    messages = [{"role": "user", "content": "What makes a network resilient?"}]
    with post_chat(url, key, {"model": model, "messages": messages,
                                                   "max_tokens": max_tokens, "temperature": 0}) as r:
        answer = json.loads(r.read())
    u = answer["usage"]
    say(f"> POST /v1/chat/completions: {messages[0]['content']}")
    say("  " + answer["choices"][0]["message"]["content"].strip().replace("\n", "\n  "))
    say(f"  [{answer['system_fingerprint']}] finish {answer['choices'][0]['finish_reason']}, usage {u['prompt_tokens']} "
        f"prompt + {u['completion_tokens']} completion tokens, paid from key 'demo''s committee credit")
    deltas = []
    with post_chat(url, key, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                                   "temperature": 0, "stream": True}) as r:
        for line in r:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunk = json.loads(line[6:])
                deltas += [c["delta"].get("content") or "" for c in chunk.get("choices", [])]
    text = "".join(deltas)
    say(f"  streamed (server-sent events): {len([d for d in deltas if d])} deltas, "
        f"{'the same answer' if text == answer['choices'][0]['message']['content'] else 'a different answer'}")
