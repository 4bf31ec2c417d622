"""The anonymous overlay: S-IDA cloves carried over onion paths of relays.

A client splits each request into n cloves (any k rebuild), wraps each in onion layers for its
own path of relays, and the last relay of each path (the proxy) hands its clove to the entry
worker; answers come back the same way over reply blocks. Modules:

- :mod:`~permamesh.overlay.erasure`: the erasure-code interface
  (:class:`ErasureCodec`) with zfec (default) and pure-Python reedsolo (measured only).
- :mod:`~permamesh.overlay.shamir`: Shamir secret sharing over GF(2^8) for the keys.
- :mod:`~permamesh.overlay.clove`: :class:`Clove` and its binary framing
  (:func:`encode_clove` / :func:`decode_clove`), fingerprint vectors.
- :mod:`~permamesh.overlay.sida`: :func:`split` a message into authenticated cloves and
  :class:`Rebuilder`, which rebuilds from any k valid ones and treats forged ones as missing.
- :mod:`~permamesh.overlay.cells`: the fixed-size onion cell format and per-hop keys.
- :mod:`~permamesh.overlay.onion`: :func:`build_forward` and :func:`peel` (what a
  relay does), :class:`ReplayGuard`.
- :mod:`~permamesh.overlay.reply`: reply blocks (:func:`build_reply_block`,
  :func:`seal_reply`, :func:`open_reply`) for the return direction.
- :mod:`~permamesh.overlay.paths`: :class:`PathSelector`, the rules of ``docs/paths.md``.
- :mod:`~permamesh.overlay.sessions`: :class:`SessionPaths`, a session's path set, its
  rotation and its repair after failures.
- :mod:`~permamesh.overlay.prepared`: path kits (the X25519 work of a clove) made
  while the client idles.
- :mod:`~permamesh.overlay.stream`: a streamed answer at the entry worker: chunks cut
  (a model's tokens or a container's output) and sent over each path's chunk blocks;
  :mod:`~permamesh.overlay.reassembly`: at the client, rebuilt and released in order;
  :mod:`~permamesh.overlay.topup`: more chunk blocks for a long stream.
- :mod:`~permamesh.overlay.relay` / ``relayproc`` and ``sender``: the network ends,
  a relay and the client (:class:`~permamesh.overlay.sender.OverlayClient`).
- :mod:`~permamesh.overlay.errors`: :class:`OverlayError`, the family of every refusal.

Who calls it: clients split and wrap, relays peel, entry workers
(:mod:`permamesh.workers.inbox`) rebuild and seal replies; see docs/architecture.md.
"""

from permamesh.overlay.clove import Clove, decode_clove, encode_clove
from permamesh.overlay.errors import OverlayError
from permamesh.overlay.onion import HopInfo, ReplayGuard, build_forward, peel
from permamesh.overlay.paths import PathPolicy, PathSelector, RelayDescriptor
from permamesh.overlay.sessions import SessionPaths
from permamesh.overlay.reply import ReplyBlock, ReplyKeys, build_reply_block, open_reply, seal_reply
from permamesh.overlay.sida import Rebuilder, rebuild, split

__all__ = [
    "Clove", "HopInfo", "OverlayError", "PathPolicy", "PathSelector", "Rebuilder", "RelayDescriptor",
    "ReplayGuard", "ReplyBlock", "ReplyKeys", "SessionPaths", "build_forward", "build_reply_block",
    "decode_clove", "encode_clove", "open_reply", "peel", "rebuild", "seal_reply", "split",
]
