"""Typed, versioned, signed frames: the only way bytes from a peer become objects.

A frame on the wire is a msgpack array ``[version, tag, body, sender, signature]``:

- ``version``: :data:`PROTOCOL_VERSION`; anything else is rejected.
- ``tag``: the message type's registered name (``Message.TAG``).
- ``body``: msgpack bytes of a map from field name to value.
- ``sender``: the signer's Ed25519 public key (32 bytes), or nil for unsigned types.
- ``signature``: Ed25519 over ``DOMAIN + tag + NUL + body``, or nil.

Decoding never trusts the peer: the frame size is checked before parsing, the tag must name a
known :class:`Message` subclass, the body must fit that type's ``MAX_BYTES``, the signature must
verify, every declared field without a default must be present with the declared type, and
unknown fields are ignored (so newer peers can add optional fields), and no string or bytes
field may exceed its type's declared length limit (``limits=`` of :func:`message`; every
``request_id`` field is held to :data:`MAX_REQUEST_ID_CHARS` whatever the type says, because
replies echo it back). Every failure is a
:class:`WireError` whose message says what was wrong; nothing else escapes :func:`decode`.

Who calls it: :mod:`permamesh.transport` users (workers, clients, and later relays and
validators) call :func:`encode` before sending and :func:`decode` on every frame received.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from typing import Any, ClassVar, TypeVar

import msgpack

from permamesh.errors import PermameshError
from permamesh.identity import SIGNATURE_BYTES, PUBLIC_KEY_BYTES, NodeIdentity, verify_signature

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
DOMAIN = b"permamesh/wire/v1\x00"
MAX_FRAME_BYTES = 4 * 1024 * 1024  # hard cap on any frame, checked before parsing
_MAX_DEPTH = 8  # nesting depth accepted in a body
MAX_REQUEST_ID_CHARS = 128  # any field named request_id, in any message type
_DEFAULT_LIMITS = {"request_id": MAX_REQUEST_ID_CHARS}

M = TypeVar("M", bound="Message")


class WireError(PermameshError):
    """A frame was malformed, unknown, oversized, mistyped or badly signed."""


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses registered with
    :func:`message`, which assigns ``TAG`` and resolves field types once."""

    TAG: ClassVar[str] = ""
    MAX_BYTES: ClassVar[int] = 64 * 1024  # body size limit for this type
    SIGNED: ClassVar[bool] = True  # decode() demands a valid signature
    LIMITS: ClassVar[dict[str, int]] = {}  # field name -> most characters (str) or bytes (bytes)

    def to_fields(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


_REGISTRY: dict[str, type[Message]] = {}
_FIELDS: dict[type, tuple[tuple[str, Any, bool], ...]] = {}  # cls -> (name, type, required)


def message(tag: str, *, max_bytes: int = 64 * 1024, signed: bool = True, limits: dict[str, int] | None = None):
    """Class decorator: make ``cls`` a frozen dataclass and register it under ``tag``.

    ``limits`` bounds the length of named str/bytes fields (characters or bytes), checked at
    both :func:`encode` and :func:`decode`; ``request_id`` is bounded even when not named."""

    def wrap(cls: type[M]) -> type[M]:
        if tag in _REGISTRY:
            raise TypeError(f"wire tag {tag!r} registered twice")
        if not tag or "\x00" in tag:
            raise TypeError(f"wire tag {tag!r} must be non-empty and free of NUL")
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls.TAG, cls.MAX_BYTES, cls.SIGNED = tag, max_bytes, signed
        cls.LIMITS = {**_DEFAULT_LIMITS, **(limits or {})}
        _REGISTRY[tag] = cls
        _register_fields(cls)
        return cls

    return wrap


def struct(cls: type[M]) -> type[M]:
    """Class decorator for a nested record (no tag, not sendable on its own)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    _register_fields(cls)
    return cls


def _register_fields(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    _FIELDS[cls] = tuple(
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )


def known_tags() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------- encode


def _to_plain(value: Any) -> Any:
    if value.__class__ in _FIELDS:
        return {name: _to_plain(getattr(value, name)) for name, _, _ in _FIELDS[value.__class__]}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _signed_bytes(tag: str, body: bytes) -> bytes:
    """What a signature covers: domain, tag, a NUL separator (tags never hold one), body."""
    return DOMAIN + tag.encode() + b"\x00" + body


def _check_limits(cls: type, fields: dict[str, Any], where: str) -> None:
    """Refuse a str or bytes field longer than the type allows (before any object is built)."""
    for name, limit in getattr(cls, "LIMITS", {}).items():
        value = fields.get(name)
        if isinstance(value, (str, bytes)) and len(value) > limit:
            unit = "characters" if isinstance(value, str) else "bytes"
            raise WireError(f"{where}.{name}: {len(value)} {unit} exceeds limit {limit}")


def encode(msg: Message, signer: NodeIdentity | None = None) -> bytes:
    """Serialize ``msg`` into one frame, signed by ``signer`` when the type is signed.

    Refuses (:class:`WireError`) what a peer's :func:`decode` would refuse for its size."""
    _check_limits(msg.__class__, {name: getattr(msg, name, None) for name in msg.LIMITS}, msg.TAG)
    try:
        body = msgpack.packb(msg.to_fields(), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. a lone surrogate in a str
        raise WireError(f"{msg.TAG}: cannot encode: {exc}") from None
    if len(body) > msg.MAX_BYTES:
        raise WireError(f"{msg.TAG}: body of {len(body)} bytes exceeds limit {msg.MAX_BYTES}")
    sender = signature = None
    if msg.SIGNED:
        if signer is None:
            raise WireError(f"{msg.TAG} must be signed: pass signer=")
        sender = signer.public.sign_key
        signature = signer.sign(_signed_bytes(msg.TAG, body))
    return msgpack.packb([PROTOCOL_VERSION, msg.TAG, body, sender, signature], use_bin_type=True)


# ---------------------------------------------------------------------------------- decode


@dataclasses.dataclass(frozen=True)
class Received:
    """A decoded frame: the message and the public key that signed it (None if unsigned)."""

    msg: Message
    sender: bytes | None


def _unpack(data: bytes, limit: int) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise WireError(f"not valid msgpack: {exc.__class__.__name__}: {exc}") from None


def decode(frame: bytes, expect: type[M] | tuple[type[Message], ...] | None = None) -> Received:
    """Decode and check one frame; raise :class:`WireError` with a clear reason otherwise."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError("frame is not bytes")
    frame = bytes(frame)
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(frame)} bytes exceeds limit {MAX_FRAME_BYTES}")
    outer = _unpack(frame, MAX_FRAME_BYTES)
    if not isinstance(outer, tuple) or len(outer) != 5:
        raise WireError("frame must be an array of 5 items [version, tag, body, sender, sig]")
    version, tag, body, sender, signature = outer
    if type(version) is not int:  # never format peer values of unknown shape (deep nesting)
        raise WireError(f"protocol version must be an int, got {type(version).__name__}")
    if version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version} (speaking {PROTOCOL_VERSION})")
    if not isinstance(tag, str):
        raise WireError(f"message type must be a string, got {type(tag).__name__}")
    if tag not in _REGISTRY:
        raise WireError(f"unknown message type {tag[:64]!r}")
    cls = _REGISTRY[tag]
    if expect is not None and not issubclass(cls, expect):
        raise WireError(f"unexpected message type {tag!r} here")
    if not isinstance(body, bytes):
        raise WireError(f"{tag}: body must be bytes")
    if len(body) > cls.MAX_BYTES:
        raise WireError(f"{tag}: body of {len(body)} bytes exceeds limit {cls.MAX_BYTES}")
    if cls.SIGNED:
        if not isinstance(sender, bytes) or len(sender) != PUBLIC_KEY_BYTES:
            raise WireError(f"{tag}: missing or malformed sender key")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            raise WireError(f"{tag}: missing or malformed signature")
        if not verify_signature(sender, signature, _signed_bytes(tag, body)):
            raise WireError(f"{tag}: bad signature")
    else:
        sender = None
    fields = _unpack(body, cls.MAX_BYTES)
    return Received(_build(cls, fields, tag, 0), sender)


def _build(cls: type, fields: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise WireError(f"{where}: nested too deeply")
    if not isinstance(fields, dict):
        raise WireError(f"{where}: expected a map of fields")
    kwargs = {}
    for name, tp, required in _FIELDS[cls]:
        if name not in fields:
            if required:
                raise WireError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _check(tp, fields[name], f"{where}.{name}", depth)
    _check_limits(cls, kwargs, where)
    try:
        return cls(**kwargs)
    except WireError:
        raise
    except (TypeError, ValueError) as exc:
        raise WireError(f"{where}: {exc}") from None


def _check(tp: Any, value: Any, where: str, depth: int) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(arg, value, where, depth)
            except WireError:
                pass
        raise WireError(f"{where}: expected {tp}, got {type(value).__name__}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            raise WireError(f"{where}: expected an array, got {type(value).__name__}")
        return tuple(_check(args[0], v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected a map, got {type(value).__name__}")
        return {
            _check(key_t, k, f"{where} key", depth + 1): _check(val_t, v, f"{where}[{k!r}]", depth + 1)
            for k, v in value.items()
        }
    if tp in _FIELDS:
        return _build(tp, value, where, depth + 1)
    if tp is bool:
        if not isinstance(value, bool):
            raise WireError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError(f"{where}: expected float, got {type(value).__name__}")
        if not math.isfinite(value):
            raise WireError(f"{where}: float must be finite")
        return float(value)
    if tp in (str, bytes):
        if not isinstance(value, tp):
            raise WireError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"wire type {tp!r} is not supported (at {where})")
