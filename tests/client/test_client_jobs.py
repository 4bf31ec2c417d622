"""permamesh.Client and AsyncClient on a real mesh: a worker process (tiny-random) that also runs
containers, 12 relay processes, joined through the mesh's own committee, a busybox image in
DATA_DIR/images. Generation and container jobs, direct and anonymous, sync and async; and the
README's client example, run as is. The clients find the mesh as a user's would after
`permamesh demo --serve`: through DATA_DIR/join, which names the committee."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from permamesh import AsyncClient, Client
from permamesh.client.blocking import ClientError
from permamesh.containers.build import build_image
from permamesh.demo.mesh import EmbeddedMesh, MeshConfig
from permamesh.directory.join import forget_join, remember_join

from tests.containers.conftest import installed_runtimes
from tests.containers.test_mesh import busybox_layers

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def mesh_home(home, tmp_path):
    if not installed_runtimes():
        pytest.skip("neither runc nor bwrap installed (apt-get install -y runc bubblewrap)")
    build_image(None, home / "images", "bb", ["/bin/sh"], layers=busybox_layers(tmp_path)[:1])
    with EmbeddedMesh(MeshConfig(home, workers=1, model="tiny-random", device="cpu", relays=12, threads_per_worker=1,
                                 worker_args=("--containers", "--prefix-cache-mb", "0"))) as mesh:
        remember_join(home, mesh.join)
        yield home
        forget_join(home, mesh.join)


def test_sync_and_async_clients_run_both_kinds_of_jobs(mesh_home):
    with Client(data_dir=mesh_home) as client:
        pieces = []
        direct = client.generate("hello", max_tokens=4, on_text=pieces.append)
        assert direct.completion_tokens >= 1 and "".join(pieces) == direct.text
        job = client.run("bb", ["/bin/sh", "-c", "echo direct; exit 4"])
        assert (job.exit_code, job.stdout) == (4, b"direct\n")
        with pytest.raises(ClientError, match="bad_image"):
            client.run("no-such-image")
    with Client(data_dir=mesh_home, anonymous=True) as client:
        hidden = client.generate("hello", max_tokens=4, temperature=0)
        assert hidden.text == client.generate("hello", max_tokens=4, temperature=0).text
        # every request field travels through the overlay: a grammar, penalties, top log-probs
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        shaped = client.generate("hello", max_tokens=40, temperature=0, presence_penalty=1.0, logprobs=True,
                                 top_logprobs=2, grammar_kind="json_schema", grammar=json.dumps(schema))
        assert isinstance(json.loads(shaped.text)["ok"], bool) and len(shaped.top_logprobs) == len(shaped.token_ids)
        assert client.run("bb", ["/bin/echo", "anonymous"]).stdout == b"anonymous\n"

    async def main():
        async with AsyncClient(data_dir=mesh_home) as client:
            answers = await asyncio.gather(*(client.generate(f"count {n}", max_tokens=3) for n in range(3)))
            streamed = [t async for t in client.stream("stream me", max_tokens=4, temperature=0)]
            whole = await client.generate("stream me", max_tokens=4, temperature=0)
            job = await client.run("bb", ["/bin/echo", "async"])
            return answers, streamed, whole, job

    answers, streamed, whole, job = asyncio.run(main())
    assert len(answers) == 3 and all(a.completion_tokens >= 1 for a in answers)
    assert "".join(streamed) == whole.text and job.stdout == b"async\n"


def test_the_readme_client_example_runs_as_is(mesh_home):
    text = README.read_text()
    code = re.search(r"<!-- client example -->\n```python\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PERMAMESH_HOME": str(mesh_home)})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert "0 hello from a container" in out.stdout and lines[-1] == "0 42"
