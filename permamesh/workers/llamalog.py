"""llama.cpp's own log lines (hundreds per model load or conversion) go to Python logging.

Who calls it: everything in this package that calls into llama.cpp
(:mod:`permamesh.workers.llamacpp`, :mod:`permamesh.workers.ggufweights`) and the raw baseline
of ``bench engine``, before their first native call.
"""

from __future__ import annotations

import ctypes
import logging

# named after the engine module, as before this module existed: log filters keep working
_native = logging.getLogger("permamesh.workers.llamacpp.native")
_NATIVE_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level
_callback = None  # kept alive: llama.cpp holds a pointer to it


def route_native_log(L) -> None:
    """Send llama.cpp's (module ``L``) log to a logger: debug, warning, error. Idempotent."""
    global _callback
    if _callback is not None:
        return
    last = [logging.DEBUG]

    @L.llama_log_callback
    def callback(level, text, user_data):
        last[0] = _NATIVE_LEVELS.get(level, last[0])  # 5 continues the previous line's level
        if _native.isEnabledFor(last[0]):
            _native.log(last[0], "%s", text.decode("utf-8", errors="replace").rstrip())

    _callback = callback
    L.llama_log_set(callback, ctypes.c_void_p(0))
