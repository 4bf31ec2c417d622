"""Headless Chromium for the dashboard tests (Debian's chromium package): the rendered DOM
(``--dump-dom``, after the page's script ran) parsed into elements, and screenshots read back
as pixels."""

from __future__ import annotations

import html.parser
import shutil
import subprocess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
WORKER_RGB = (0x1F, 0x77, 0xB4)
RELAY_RGB = (0x2C, 0xA0, 0x2C)


class Dom(html.parser.HTMLParser):
    """The rendered page's elements with their attributes and text."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict] = []
        self.elements: list[dict] = []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag not in ("br", "img", "input", "meta", "link", "circle", "line", "rect", "polyline"):
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data

    def find(self, tag=None, cls=None, **attrs):
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and (cls is None or cls in e["attrs"].get("class", "").split())
                and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def by_id(self, ident):
        return next(e for e in self.elements if e["attrs"].get("id") == ident)


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True,
                          timeout=120)




def colour_pixels(png, shape):
    """A function counting the screenshot's pixels within a small distance of an RGB colour."""
    import matplotlib.image

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    assert pixels.shape[:2] == shape

    def count(rgb) -> int:
        return int(((abs(pixels - rgb)).sum(axis=2) <= 6).sum())

    return count


def render(tmp_path, url: str) -> Dom:
    """The DOM of ``url`` once its script ran (20 s of virtual time), parsed."""
    out = chromium(tmp_path, "--virtual-time-budget=20000", "--dump-dom", url)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    dom = Dom()
    dom.feed(out.stdout.decode())
    assert dom.find("body")[0]["attrs"].get("data-rendered") == "1", "the page's script rendered /api/mesh"
    return dom
