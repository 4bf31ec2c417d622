"""Finding the CometBFT binary, and checking that it is the version we pin.

We look, in order, at:

1. ``$PERMAMESH_COMETBFT`` (a path to the binary; if set, it must be right: we never fall
   back past an explicit choice);
2. ``<repo>/.tools/bin/cometbft`` (where ``make tools`` installs it);
3. ``cometbft`` on ``PATH``.

The first one found must report :data:`COMETBFT_VERSION` from ``cometbft version``; a
missing or wrong binary raises :class:`CometBFTMissing`, whose message says how to install
the right one. The Makefile pins the same version (``COMETBFT_VERSION``); a test checks
that both agree.

Who calls it: :class:`~permamesh.committee.cometbft.network.CometNet` and the tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from permamesh.committee.errors import CommitteeError

log = logging.getLogger(__name__)

COMETBFT_VERSION = "0.38.25"  # keep in step with COMETBFT_VERSION in the Makefile
MODULE = "github.com/cometbft/cometbft/cmd/cometbft"
ENV_VAR = "PERMAMESH_COMETBFT"
REPO_ROOT = Path(__file__).resolve().parents[3]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"

_checked: dict[Path, str] = {}  # binaries whose version we already read (path -> version)


class CometBFTMissing(CommitteeError):
    """No CometBFT binary of the pinned version could be found."""


def install_hint() -> str:
    return (f"install it with `make tools` (runs `go install {MODULE}@v{COMETBFT_VERSION}` "
            f"into {TOOLS_BIN}), or point ${ENV_VAR} at a cometbft v{COMETBFT_VERSION} binary")


def binary_version(path: Path, timeout_s: float = 20.0) -> str:
    """What ``path version`` prints (stripped); CometBFTMissing if it cannot run."""
    path = Path(path)
    if path in _checked:
        return _checked[path]
    try:
        out = subprocess.run([str(path), "version"], capture_output=True, text=True,
                             timeout=timeout_s, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise CometBFTMissing(f"{path} does not run as `cometbft version` ({exc}); "
                              f"{install_hint()}") from None
    # `cometbft version` prints the bare version ("0.38.25"); tolerate a leading "v"
    version = out.splitlines()[-1].strip().removeprefix("v") if out else ""
    _checked[path] = version
    return version


def candidates() -> list[tuple[str, Path]]:
    """Where we look, in order, as (why, path); only places that hold a file."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return [(f"${ENV_VAR}", Path(explicit).expanduser())]
    found = []
    local = TOOLS_BIN / "cometbft"
    if local.is_file():
        found.append(("the repository's .tools/bin", local))
    on_path = shutil.which("cometbft")
    if on_path:
        found.append(("PATH", Path(on_path)))
    return found


def find_cometbft() -> Path:
    """The path of a cometbft binary of :data:`COMETBFT_VERSION`; CometBFTMissing otherwise."""
    places = candidates()
    if not places:
        raise CometBFTMissing(f"cometbft v{COMETBFT_VERSION} not found (looked at ${ENV_VAR}, "
                              f"{TOOLS_BIN / 'cometbft'} and PATH); {install_hint()}")
    wrong = []
    for why, path in places:
        if not path.is_file():
            wrong.append(f"{path} (from {why}) does not exist")
            continue
        version = binary_version(path)
        if version == COMETBFT_VERSION:
            log.debug("cometbft %s at %s (from %s)", version, path, why)
            return path
        wrong.append(f"{path} (from {why}) is version {version or '?'!s}")
    raise CometBFTMissing(f"need cometbft v{COMETBFT_VERSION}, but " + "; ".join(wrong)
                          + f"; {install_hint()}")
