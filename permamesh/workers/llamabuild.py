"""Build llama-cpp-python once, keep the wheel, install it, and check that it really runs.

llama-cpp-python publishes no Linux wheel: ``make setup`` runs this module, which

1. does nothing if the pinned version is installed and passed its check before;
2. else installs the wheel kept in the cache directory (``.cache/wheels/``, one folder per
   version and build flags) by an earlier build;
3. else builds one from the source distribution (``pip wheel``; cmake and a C/C++ compiler;
   5-13 minutes on 2 cores), showing the compiler's progress, and keeps it there;
4. checks the installed library in a child process: load the SmolLM2 GGUF (when present) and
   decode a few tokens in two sequences. A build that crashes there (this machine kind reports
   AMX but faults on it, hence ``-mno-amx-*``) is uninstalled and its wheel dropped.

On any failure it says why and exits 1; ``make setup`` goes on, and ``--backend auto`` serves
with torch (:func:`permamesh.workers.backends.choose`).

Who calls it: the Makefile (``python -m permamesh.workers.llamabuild``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

VERSION = "0.3.36"
# Native code for this machine, without AMX (advertised by some virtual machines that fault on
# it); ggml's own thread pool instead of OpenMP (as fast on an idle machine, and 4x faster when
# another process keeps one core busy: OpenMP's spinning threads fell from 80 to 6 tok/s here);
# only the library: no tests, examples, tools or server.
CMAKE_ARGS = ("-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
              "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DGGML_OPENMP=OFF -DGGML_BLAS=OFF "
              "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF")
CHECKED = "llama-cpp-python-{version}.checked"  # marker in the cache directory: this install passed the check
FAILED = "llama-cpp-python-{version}.failed"  # marker: the build or check failed; not retried without --retry
_PROGRESS = re.compile(r"^\s*\[(\d+)/(\d+)\]\s")
_SOURCE = re.compile(r"\s-c\s+(\S+)")
_CHECK = """
import ctypes, sys
import llama_cpp as L
from permamesh.workers.llamacpp import load_gguf, LlamaEngine
from permamesh.workers import models
from permamesh.workers.sampling import SamplingParams
try:
    gguf = models.smollm2_gguf()
except Exception:
    print("no GGUF to check with; import only"); sys.exit(0)
engine = LlamaEngine(load_gguf("check", gguf, 2))
runs = [engine.start([1, 2, 3, 4 + i], SamplingParams(max_tokens=3)) for i in range(2)]
while any(not r.done for r in runs):
    engine.step([r for r in runs if not r.done])
print("decoded", [len(engine.finish(r).token_ids) for r in runs])
"""


def say(msg: str) -> None:
    print(f"llama.cpp: {msg}", flush=True)


def installed_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed (or broken metadata)
        return None


def cached_wheel(cache: Path, version: str) -> Path | None:
    found = sorted(cache.glob(f"llama_cpp_python-{version}-*.whl"))
    return found[-1] if found else None


def build_wheel(cache: Path, version: str) -> Path | None:
    """``pip wheel`` the sdist into ``cache``, printing progress; the wheel, or None."""
    log_path = cache / f"llama-cpp-python-{version}-build.log"
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(cache), f"llama-cpp-python=={version}"]
    say(f"building llama-cpp-python {version} from source, once (5-13 min on 2 cores); full log: {log_path}")
    started, shown = time.monotonic(), -1
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                                      text=True, errors="replace") as proc:
        for line in proc.stdout:
            log.write(line)
            m = _PROGRESS.match(line)
            if m:
                done, total = int(m[1]), int(m[2])
                percent = 100 * done // total
                if percent // 5 != shown // 5 or done == total:  # a line per 5%
                    shown = percent
                    source = _SOURCE.search(line)
                    what = Path(source[1]).name if source else "linking"
                    say(f"  [{done:>3}/{total}] {percent:>3}%  {time.monotonic() - started:5.0f} s  {what}")
            elif "Building wheel" in line or "Downloading" in line or "error" in line.lower() and "-W" not in line:
                say("  " + line.strip()[:160])
    if proc.returncode != 0:
        say(f"build failed (exit {proc.returncode}) after {time.monotonic() - started:.0f} s; see {log_path}")
        return None
    say(f"built in {time.monotonic() - started:.0f} s")
    return cached_wheel(cache, version)


def check() -> bool:
    """Load and decode in a child process (a crash there must not take this one down)."""
    result = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=600)
    if result.returncode == 0:
        say(f"check passed: {result.stdout.strip().splitlines()[-1] if result.stdout.strip() else 'ok'}")
        return True
    tail = "\n".join((result.stderr or "").strip().splitlines()[-5:])
    say(f"check failed (exit {result.returncode}):\n{tail}")
    return False


def build_dir(cache: Path, version: str) -> Path:
    """Where the wheel of ``version`` built with :data:`CMAKE_ARGS` is kept (new flags, new build)."""
    return cache / f"llama-cpp-python-{version}-{hashlib.sha256(CMAKE_ARGS.encode()).hexdigest()[:8]}"


def ensure(cache: Path, version: str = VERSION, retry: bool = False) -> bool:
    cache = build_dir(cache, version)
    cache.mkdir(parents=True, exist_ok=True)
    marker, failed = cache / CHECKED.format(version=version), cache / FAILED.format(version=version)
    if installed_version() == version and marker.exists():
        say(f"llama-cpp-python {version} installed and checked")
        return True
    if failed.exists() and not retry:
        say(f"an earlier build failed ({failed.read_text().strip()}); not retrying (make llamacpp LLAMA_RETRY=1 does)")
        return False
    failed.unlink(missing_ok=True)
    wheel = cached_wheel(cache, version)
    if wheel is None:
        wheel = build_wheel(cache, version)
        if wheel is None:
            failed.write_text(f"build failed; log: {cache / f'llama-cpp-python-{version}-build.log'}\n")
            return False
    else:
        say(f"installing the wheel built earlier: {wheel}")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel)])
    if pip.returncode != 0 or subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "diskcache"]).returncode:
        say("pip could not install the wheel")
        return False
    if not check():
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", "llama-cpp-python"])
        wheel.unlink(missing_ok=True)
        marker.unlink(missing_ok=True)
        failed.write_text("the built library failed its check (it crashed or could not decode)\n")
        return False
    marker.write_text(f"{wheel.name}\n")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m permamesh.workers.llamabuild", description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".cache/wheels"), help="where built wheels are kept")
    p.add_argument("--version", default=VERSION, help=f"llama-cpp-python version (default: {VERSION})")
    p.add_argument("--retry", action="store_true", help="build again even if an earlier build failed")
    args = p.parse_args(argv)
    if ensure(args.cache, args.version, args.retry):
        return 0
    say("not available: workers serve with torch (`--backend auto`); `make setup` tries again")
    return 1


if __name__ == "__main__":
    sys.exit(main())
