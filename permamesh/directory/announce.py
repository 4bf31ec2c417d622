"""A node's own descriptor on the committee's ledger: what it advertises, signed by itself.

:func:`advertised` turns the address a server bound (``--host``) and the one it should be
reached at (``--advertise HOST:PORT``) into the endpoint it publishes: binding 0.0.0.0 or ::
never publishes 0.0.0.0 or ::. :func:`announce` signs an ``Announce`` transaction with the
node's key (the node must already be registered by its partner, with the same role) and waits
for its commit; a refusal or an unreachable committee raises
:class:`~permamesh.directory.errors.DirectoryError` with the committee's reason, in bounded time.

Who calls it: worker and relay processes started with ``--join``, once they serve.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

from permamesh.committee import txs
from permamesh.committee.client import CommitteeClient
from permamesh.committee.endpoints import is_loopback
from permamesh.committee.endpoints import EndpointError, parse_endpoint
from permamesh.committee.errors import CommitteeError
from permamesh.directory.errors import DirectoryError
from permamesh.identity import NodeIdentity
from permamesh.transport import split_endpoint

log = logging.getLogger(__name__)

VERSION = "permamesh-0.1"
_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})")
_UNSPECIFIED = ("0.0.0.0", "::", "[::]", "")


def advertised(bound: str, advertise: str | None) -> str:
    """The ``tcp://HOST:PORT`` to publish for a server bound at ``bound`` (its endpoint)."""
    address, _ = split_endpoint(bound)
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if advertise:
        m = _HOSTPORT.fullmatch(advertise.removeprefix("tcp://"))
        if not m or not 1 <= int(m.group(2)) <= 65535 or m.group(1) in _UNSPECIFIED:
            raise DirectoryError(f"--advertise {advertise!r} is not a reachable HOST:PORT")
        return f"tcp://{m.group(1)}:{m.group(2)}"
    if host in _UNSPECIFIED:
        raise DirectoryError(f"bound to {host or 'every address'}: say where peers reach this node "
                             "with --advertise HOST:PORT")
    return f"tcp://{host}:{port}"


def check_reachable(endpoint: str, committee: Sequence[str]) -> None:
    """Refuse to publish a loopback address to a committee that is not itself on loopback:
    nodes on other hosts could never reach it."""
    host = endpoint.removeprefix("tcp://").rpartition(":")[0]
    remote = [c for c in committee if not is_loopback(c.split("://", 1)[-1].rpartition(":")[0])]
    if is_loopback(host) and remote:
        raise DirectoryError(f"this node would publish {endpoint}, which peers on other hosts cannot reach "
                             f"(the committee is at {remote[0]}): bind a routable --host, or give --advertise HOST:PORT")


def announce(identity: NodeIdentity, committee: Sequence[str], endpoint: str, *, model: str = "",
             group: str = "", layers: str = "", engine: str = "", timeout_s: float = 10.0) -> int:
    """Publish this node's descriptor; returns the height it was committed at."""
    check_reachable(endpoint, committee)
    try:
        with CommitteeClient(list(committee), timeout_s) as client:
            chain_id = client.query("/status")["chain_id"]
            nonce = client.next_nonce(identity.public.sign_key)
            tx = txs.Announce(chain_id=chain_id, nonce=nonce, transport_key=identity.transport.public_bytes,
                              endpoint=endpoint, model=model, group=group, layers=layers, version=VERSION,
                              seq=time.time_ns() // 1000, engine=engine)  # increases across restarts of this node
            outcome = client.submit(txs.sign_tx(tx, identity), timeout_s=timeout_s)
    except CommitteeError as exc:
        raise DirectoryError(f"cannot announce {identity.node_id} to the committee at "
                             f"{', '.join(committee)}: {exc}") from None
    if not outcome.ok:
        raise DirectoryError(f"the committee refused {identity.node_id}'s descriptor ({outcome.code}): {outcome.log}")
    log.info("announced %s at %s (height %d)", identity.node_id, endpoint, outcome.height)
    return outcome.height


def publish_validators(client: CommitteeClient, chain_id: str, partner: NodeIdentity,
                       members: Sequence[NodeIdentity], endpoints: Sequence[str], timeout_s: float = 30.0) -> None:
    """Put the committee's own validators in the directory: the seed ``partner`` registers each
    member key as a validator node, then each member announces the address clients reach it at
    (``https://HOST:PORT?key=HEX`` for CometBFT's RPC, or the devnet's ``tcp://HOST:PORT?key=HEX``,
    is published as ``tcp://HOST:PORT`` with the member's transport key; a reader maps it back
    to the scheme it used itself, pinned to the key the member's row holds:
    :meth:`~permamesh.directory.snapshot.Snapshot.validators`). An endpoint whose key is not
    its member's is refused before anything is sent. Lets a client that knows one validator
    find a second one to check the directory against. Who calls it: the committee launchers'
    callers (the demo, tests, benchmarks)."""
    addresses = [_member_address(member, endpoint) for member, endpoint in zip(members, endpoints)]
    nonce = client.next_nonce(partner.public.sign_key)
    regs = [txs.sign_tx(txs.RegisterNode(chain_id=chain_id, nonce=nonce + i, node_key=m.public.sign_key,
                                         kex_key=m.public.kex_key, role="validator", endpoint="",
                                         profile=txs.NodeProfile(0, 0, "committee", "committee", 0)), partner)
            for i, m in enumerate(members)]
    problems = [o.log for o in client.submit_many(regs, timeout_s) if not o.ok]
    if problems:
        raise DirectoryError(f"registering the validators failed: {problems[0]}")
    seq = time.time_ns() // 1000
    announces = []
    for member, address in zip(members, addresses):
        tx = txs.Announce(chain_id=chain_id, nonce=client.next_nonce(member.public.sign_key),
                          transport_key=member.transport.public_bytes, endpoint=address, model="", group="",
                          layers="", version=VERSION, seq=seq)
        announces.append(txs.sign_tx(tx, member))
    problems = [o.log for o in client.submit_many(announces, timeout_s) if not o.ok]
    if problems:
        raise DirectoryError(f"announcing the validators failed: {problems[0]}")


def _member_address(member: NodeIdentity, endpoint: str) -> str:
    """The ``tcp://HOST:PORT`` a member announces for ``endpoint``, once its key is checked:
    ``https://`` must pin the member's node key, ``tcp://`` name its transport key."""
    try:
        ep = parse_endpoint(endpoint)
    except EndpointError as exc:
        raise DirectoryError(f"validator {member.node_id}: {exc}") from None
    expected = {"https": member.public.sign_key, "tcp": member.transport.public_bytes}.get(ep.scheme)
    if ep.key is not None and ep.key != expected:
        what = "node key" if ep.scheme == "https" else "transport key"
        raise DirectoryError(f"{endpoint} names key {ep.key.hex()[:16]}..., not validator {member.node_id}'s "
                             f"{what} {expected.hex()[:16]}...")
    return f"tcp://{ep.hostport}"
