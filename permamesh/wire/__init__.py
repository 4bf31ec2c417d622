"""Wire: typed, versioned, signed messages and nothing else.

- :mod:`permamesh.wire.codec`: the frame format, :func:`encode`, :func:`decode`, the
  :class:`WireError` family and the ``@message`` / ``@struct`` registries.
- :mod:`permamesh.wire.messages`: the messages of the request path (client <-> worker).

Later packages add their own message modules with ``@message``; the codec decodes only
registered types, so a peer can never make us build an object we did not declare.
"""

from permamesh.wire.codec import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Message,
    Received,
    WireError,
    decode,
    encode,
    known_tags,
    message,
    struct,
)
from permamesh.wire.messages import (
    Accepted,
    ChatMessage,
    ErrorReply,
    ForwardedRequest,
    GenerateRequest,
    GenerateResult,
    Progress,
    StatusReply,
    StatusRequest,
    TokenChunk,
    TopLogprobs,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Accepted",
    "ChatMessage",
    "ErrorReply",
    "ForwardedRequest",
    "GenerateRequest",
    "GenerateResult",
    "Progress",
    "Message",
    "Received",
    "StatusReply",
    "StatusRequest",
    "TokenChunk",
    "TopLogprobs",
    "WireError",
    "decode",
    "encode",
    "known_tags",
    "message",
    "struct",
]
