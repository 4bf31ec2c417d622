"""The root of permamesh's exception families.

Each package (and each shared leaf module) defines one exception family that derives from
:class:`PermameshError`, so callers can catch one package's failures without catching
programming errors (``TypeError``, ``KeyError``) by accident.
"""

from __future__ import annotations


class PermameshError(Exception):
    """Base of every error permamesh raises on purpose."""
