"""A one-way delay line between a simulated host and its bridge, for kernels without netem.

:class:`~permamesh.ops.netns.Hosts` runs this module (``python -m permamesh.ops.delayline``)
inside its bridge namespace for each delayed host when ``tc qdisc ... netem`` is unavailable
(this project's own machines lack ``CONFIG_NET_SCH_NETEM``). There the host's veth end
(``h{i}``) is not a bridge port; a second veth pair joins ``d{i}`` (ours) to the port
``p{i}``. The line reads every frame the host sends on ``h{i}``, holds it ``delay_ms`` and
writes it to ``d{i}``; frames toward the host pass ``d{i}`` -> ``h{i}`` at once. That is what
netem on the host's ``eth0`` does: its egress is delayed, its ingress is not.

Both raw sockets use ``PACKET_VNET_HDR``, so checksum-offloaded and GSO frames (veths make
both) cross with their offload header and the kernel finishes them on the far side. The
delay is constant, so frames leave in the order they came (a FIFO, not a heap). A frame the
kernel refuses to send is dropped and counted, like a lossy link; SIGTERM ends the line.
Precision is that of a Python loop on a shared CPU: about +0.1-1 ms per hop.
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_VNET_HDR = 263, 15
MAX_FRAME = 262_144  # bytes; a GSO frame on a veth is at most 64 KiB (+ 10-byte vnet header)
MAX_HELD_BYTES = 64 << 20  # frames held at once; beyond it new ones are dropped (bounded memory)
SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max


def _raw(dev: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    sock.bind((dev, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def run(host_dev: str, bridge_dev: str, delay_ms: float) -> dict[str, int]:
    """Forward frames between the two interfaces until SIGTERM; returns the counts."""
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    delay_s = delay_ms / 1e3
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    buf = bytearray(MAX_FRAME)
    counts = {"delayed": 0, "passed": 0, "dropped": 0}
    held_bytes = 0
    with _raw(host_dev) as from_host, _raw(bridge_dev) as to_bridge:
        print(f"READY {host_dev}->{bridge_dev} delay-{delay_ms:g}ms", flush=True)
        while not stopping:
            wait = max(0.0, held[0][0] - time.monotonic()) if held else 0.1  # how soon SIGTERM is seen
            try:
                readable, _, _ = select.select([from_host, to_bridge], [], [], wait)
            except InterruptedError:
                continue
            for sock in readable:
                while True:
                    try:
                        n, _, _, addr = sock.recvmsg_into([buf], 0, socket.MSG_TRUNC)
                    except BlockingIOError:
                        break
                    if addr[2] == PACKET_OUTGOING:
                        continue  # our own writes, seen on the way out
                    if n > MAX_FRAME:
                        counts["dropped"] += 1
                        continue
                    frame = bytes(buf[:n])
                    if sock is to_bridge:
                        counts["passed"] += _send(from_host, frame, counts)
                    elif held_bytes + n <= MAX_HELD_BYTES:
                        held.append((time.monotonic() + delay_s, frame))
                        held_bytes += n
                    else:
                        counts["dropped"] += 1
            now = time.monotonic()
            while held and held[0][0] <= now:
                frame = held.popleft()[1]
                held_bytes -= len(frame)
                counts["delayed"] += _send(to_bridge, frame, counts)
    return counts


def _send(sock: socket.socket, frame: bytes, counts: dict[str, int]) -> int:
    try:
        sock.send(frame)
        return 1
    except OSError:  # queue full, interface going away: the frame is lost, as on a wire
        counts["dropped"] += 1
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m permamesh.ops.delayline", description=run.__doc__)
    p.add_argument("host_dev")
    p.add_argument("bridge_dev")
    p.add_argument("delay_ms", type=float)
    args = p.parse_args(argv)
    counts = run(args.host_dev, args.bridge_dev, args.delay_ms)
    print(f"delay line {args.host_dev}: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
