"""What crossed the simulated wire: a bounded packet capture on the hosts' bridge.

:class:`Capture` runs this module (``python -m permamesh.ops.capture``) as a child inside the
bridge namespace of a :class:`~permamesh.ops.netns.Hosts`. The child opens one AF_PACKET raw
socket on every interface there and writes each frame that enters the bridge through one of
its ports to a pcap file. Every frame enters the bridge exactly once, so each is kept once:
frames leaving by a port, copies handed to the bridge device, and frames on interfaces that
are not ports (a delay line's) are skipped. It stops keeping frames at ``max_bytes``
(it counts the rest), stops by itself after ``max_s``, and on SIGTERM drains what the kernel
already queued and writes its counts next to the pcap file.

Who calls it: tests that must show what does or does not cross the wire in clear (a marker
sent in clear is found; a prompt sent over the encrypted transport must not be). An absence
check is only meaningful when :attr:`Capture.complete` is true (nothing dropped or missed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from permamesh.ops import procs
from permamesh.ops.netns import BRIDGE_DEV, Hosts, NetnsError

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max
PACKET_OUTGOING = 4  # sockaddr_ll.sll_pkttype of a frame an interface sends
SOL_PACKET, PACKET_STATISTICS = 263, 6
_PCAP_HEADER = struct.Struct("<IHHiIII")  # magic, version 2.4, tz, sigfigs, snaplen, linktype
_RECORD = struct.Struct("<IIII")  # seconds, microseconds, kept length, length on the wire
LINKTYPE_ETHERNET = 1


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    max_bytes: int = 8 << 20  # pcap file size cap (bytes); frames past it are counted, not kept
    max_s: float = 120.0  # the recorder stops by itself after this long (seconds)
    snaplen: int = 262_144  # bytes kept per frame; GSO frames on veths reach 64 KiB
    ready_timeout_s: float = 10.0
    stop_timeout_s: float = 5.0


@dataclasses.dataclass(frozen=True)
class CaptureStats:
    frames: int  # frames that entered the bridge while recording
    kept: int  # of those, frames written to the file
    over_size: int  # frames not kept because the file reached max_bytes
    kernel_drops: int  # frames the kernel dropped before the recorder read them
    expired: bool  # the recorder stopped at max_s, before it was asked to


class Capture:
    """``with Capture(hosts, out_dir) as cap: ...`` then ``cap.contains(b"...")``.

    Recording starts before ``__enter__`` returns and ends when the block exits; the captured
    bytes are read after that (:meth:`data`, :meth:`frames`, :meth:`contains`)."""

    def __init__(self, hosts: Hosts, out_dir: Path, name: str = "bridge",
                 config: CaptureConfig = CaptureConfig()):
        self.hosts, self.config, self.name = hosts, config, name
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / f"{name}.pcap"
        self.stats: CaptureStats | None = None
        self._child: procs.Child | None = None

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Capture:
        cfg = self.config
        argv = [sys.executable, "-m", "permamesh.ops.capture", "--out", str(self.path),
                "--max-bytes", str(cfg.max_bytes), "--max-s", str(cfg.max_s),
                "--snaplen", str(cfg.snaplen)]
        self._child = self.hosts.spawn_bridge(f"capture-{self.name}", argv, self.out_dir)
        procs.wait_ready([self._child], cfg.ready_timeout_s, error=NetnsError)
        return self

    def stop(self) -> CaptureStats | None:
        """End the recording (SIGTERM; the recorder drains the socket first); idempotent."""
        if self.stats is not None or self._child is None:
            return self.stats
        proc = self._child.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self._child.kill()
            raise NetnsError(f"capture recorder did not stop in {self.config.stop_timeout_s:g} s:\n"
                             f"{self._child.log_tail()}") from None
        finally:
            if proc.stdout and not proc.stdout.closed:
                proc.stdout.close()
        try:
            self.stats = CaptureStats(**json.loads(self._stats_path(self.path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise NetnsError(f"capture recorder left no counts ({e}); exit {proc.returncode}:\n"
                             f"{self._child.log_tail()}") from None
        if not self.complete:
            log.warning("capture %s is incomplete: %s", self.path, self.stats)
        return self.stats

    @property
    def complete(self) -> bool:
        """Every frame that crossed the bridge while recording is in the file."""
        s = self._stopped()
        return not (s.over_size or s.kernel_drops or s.expired)

    def data(self) -> bytes:
        """The pcap file's bytes (at most ``max_bytes``)."""
        self._stopped()
        return self.path.read_bytes()

    def frames(self) -> Iterator[bytes]:
        """Each kept frame (Ethernet header onwards), in arrival order."""
        blob = self.data()
        at = _PCAP_HEADER.size
        while at + _RECORD.size <= len(blob):
            _, _, kept, _ = _RECORD.unpack_from(blob, at)
            at += _RECORD.size
            yield blob[at:at + kept]
            at += kept

    def contains(self, needle: bytes) -> bool:
        """Whether ``needle`` appears in one captured frame (a needle cut across two TCP
        segments is not found: keep markers short and send them in one write)."""
        return any(needle in frame for frame in self.frames())

    def _stopped(self) -> CaptureStats:
        if self.stats is None:
            raise NetnsError("the capture is still running (read it after the with block)")
        return self.stats

    @staticmethod
    def _stats_path(pcap: Path) -> Path:
        return pcap.with_suffix(".json")


def record(out: Path, max_bytes: int, max_s: float, snaplen: int) -> CaptureStats:
    """The recorder (runs in the bridge namespace): frames to ``out`` until SIGTERM or ``max_s``."""
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    sock.settimeout(0.1)
    buf = bytearray(snaplen)
    frames = kept = over_size = 0
    ports: dict[str, bool] = {}
    deadline = time.monotonic() + max_s
    with sock, open(out, "wb") as f:
        f.write(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, LINKTYPE_ETHERNET))
        size = _PCAP_HEADER.size
        print(f"READY {BRIDGE_DEV} capture", flush=True)
        while True:
            if stopping or time.monotonic() >= deadline:
                sock.setblocking(False)  # drain what the kernel already queued, then stop
            try:
                n, flags, _, addr = sock.recvmsg_into([buf], 0, socket.MSG_TRUNC)
            except (TimeoutError, BlockingIOError):
                if stopping or time.monotonic() >= deadline:
                    break
                continue
            ifname, pkttype = addr[0], addr[2]
            if pkttype == PACKET_OUTGOING or not ports.setdefault(ifname, _is_port(ifname)):
                continue
            frames += 1
            keep = min(n, snaplen)
            if size + _RECORD.size + keep > max_bytes:
                over_size += 1
                continue
            now = time.time()
            f.write(_RECORD.pack(int(now), int(now % 1 * 1e6), keep, n))
            f.write(buf[:keep])
            size += _RECORD.size + keep
            kept += 1
        _, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    return CaptureStats(frames, kept, over_size, drops, expired=not stopping)


def _is_port(ifname: str) -> bool:
    """A port of a bridge (``ip netns exec`` mounts the namespace's own /sys)."""
    return Path(f"/sys/class/net/{ifname}/brport").exists()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m permamesh.ops.capture", description=record.__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-bytes", type=int, default=CaptureConfig.max_bytes)
    p.add_argument("--max-s", type=float, default=CaptureConfig.max_s)
    p.add_argument("--snaplen", type=int, default=CaptureConfig.snaplen)
    args = p.parse_args(argv)
    stats = record(args.out, args.max_bytes, args.max_s, args.snaplen)
    Capture._stats_path(args.out).write_text(json.dumps(dataclasses.asdict(stats)))
    print(f"capture: {stats}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
