"""`permamesh image add` and `permamesh run` as a user types them (real processes, real runtime)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from .conftest import BUSYBOX

CMD = [sys.executable, "-m", "permamesh"]


@pytest.mark.skipif(not BUSYBOX.exists() or not (shutil.which("runc") or shutil.which("bwrap")),
                    reason="needs busybox-static and runc or bubblewrap (Debian packages)")
def test_image_add_then_run(tmp_path):
    src = tmp_path / "bb"
    (src / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, src / "bin" / "busybox")
    for applet in ("sh", "echo"):
        (src / "bin" / applet).symlink_to("busybox")
    home = ["--data-dir", str(tmp_path / "home")]
    added = subprocess.run([*CMD, "image", "add", str(src), "--name", "bb", *home], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("image bb: 1 layers, manifest sha256:")
    ran = subprocess.run([*CMD, "run", *home, "bb", "--", "/bin/echo", "hello"], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == "hello\n", ran.stderr
    assert "cold start" in ran.stderr and "holds 0 of 1 layers" in ran.stderr
    again = subprocess.run([*CMD, "run", *home, "bb", "--", "/bin/sh", "-c", "exit 5"], capture_output=True, text=True)
    assert again.returncode == 5 and "warm start" in again.stderr and "holds 1 of 1 layers" in again.stderr
    missing = subprocess.run([*CMD, "run", *home, "nope"], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope" in missing.stderr
