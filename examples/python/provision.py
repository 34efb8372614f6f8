#!/usr/bin/env python3
"""An orchestrator provisioning a per-run tailnet with Cordon's Python stubs.

It creates a tailnet with a TTL, an upstream LLM provider for the tailnet's gateway and a policy, mints a
single-use key for the run's agent, watches the tailnet's events, and tears the tailnet down again (or,
with --keep, leaves it up and writes the key to a file for the CI job that starts agentd).

    ./generate.sh                        # the stubs, into ./cordon_pb
    ./provision.py --server http://127.0.0.1:7443 --token-file cordon-data/admin.token \\
        --upstream-url https://api.openai.com/v1 --upstream-key-file ~/.config/openai.key

Prints one fact a line, for a script to check: `tailnet <id>`, `key <key id>`, `event <kind>` for each
event of the tailnet, then `done`. Secrets (the admin token, the upstream key, the auth key) are never
printed. Any failed call ends the script with one line on stderr and exit code 1.
"""

import argparse
import os
import secrets
import sys
import threading
from pathlib import Path

try:
    import grpc
except ImportError:
    sys.exit("provision.py: the grpc module is missing: python3 -m pip install grpcio grpcio-tools")

HERE = Path(__file__).resolve().parent

# Nodes tagged `tag:agent` may call the gateway's OpenAI models, and reach nothing else.
POLICY = """{
  "tagOwners": { "tag:agent": [] },
  "grants": [
    { "src": ["tag:agent"], "dst": ["gateway"], "ip": ["tcp:80"],
      "app": { "cordon.dev/cap/ai": [{ "models": ["openai/*"] }] } }
  ]
}"""

# How long a unary call may take, and how long teardown waits for its event on the watch stream.
CALL_TIMEOUT_S = 10
EVENT_DEADLINE_S = 10


class Failure(Exception):
    """Ends the script with this one-line message."""


def parse_args():
    p = argparse.ArgumentParser(description="Provision (and tear down) a per-run Cordon tailnet.")
    p.add_argument("--server", required=True, help="http://host:port, or https://host:port for a TLS server")
    p.add_argument("--token-file", type=Path, help="file holding the admin token (default: $CORDON_TOKEN)")
    p.add_argument("--ca-cert", type=Path, help="PEM CA to trust for an https:// server")
    p.add_argument("--stubs", type=Path, default=HERE / "cordon_pb", help="where generate.sh wrote the stubs")
    p.add_argument("--owner", default="ci", help="owner of the tailnet (default: ci)")
    p.add_argument("--upstream-url", required=True, help="base URL of the OpenAI API, e.g. https://api.openai.com/v1")
    p.add_argument("--upstream-key-file", type=Path, required=True, help="file holding the upstream API key")
    p.add_argument("--keep", action="store_true", help="leave the tailnet up (it expires after an hour)")
    p.add_argument("--key-out", type=Path, help="with --keep: write the auth key's secret here (mode 0600)")
    args = p.parse_args()
    if args.keep != (args.key_out is not None):
        p.error("--keep and --key-out go together: a kept tailnet's key is only useful written out")
    return args


def read_secret(path, what):
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise Failure(f"cannot read the {what} from {path}: {e.strerror}") from None
    if not value:
        raise Failure(f"{path} is empty; it should hold the {what}")
    return value


def admin_token(args):
    if args.token_file is not None:
        return read_secret(args.token_file, "admin token")
    token = os.environ.get("CORDON_TOKEN", "").strip()
    if not token:
        raise Failure("no admin token: pass --token-file (the server's <data-dir>/admin.token) or set CORDON_TOKEN")
    return token


def load_stubs(stubs):
    """The generated modules, found under `stubs` (they import themselves as `cordon.v1.*`)."""
    sys.path.insert(0, str(stubs))
    try:
        from cordon.v1 import cordon_pb2, cordon_pb2_grpc
    except ImportError as e:
        raise Failure(f"no Cordon stubs in {stubs} ({e}): run {HERE / 'generate.sh'} {stubs}") from None
    return cordon_pb2, cordon_pb2_grpc


def open_channel(server, ca_cert):
    if server.startswith("http://"):
        return grpc.insecure_channel(server.removeprefix("http://").rstrip("/"))
    if server.startswith("https://"):
        try:
            roots = ca_cert.read_bytes() if ca_cert is not None else None
        except OSError as e:
            raise Failure(f"cannot read the CA certificate {ca_cert}: {e.strerror}") from None
        return grpc.secure_channel(server.removeprefix("https://").rstrip("/"), grpc.ssl_channel_credentials(roots))
    raise Failure(f"--server {server!r} should start with http:// or https://")


class Control:
    """The admin API with the bearer token on every call; a failed call becomes a `Failure` naming it."""

    def __init__(self, stub, token):
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, method, request):
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            raise Failure(f"{method} failed: {e.code().name}: {e.details()}") from None

    def watch(self, request):
        # A streaming call: no timeout, the watcher cancels it.
        return self.stub.WatchEvents(request, metadata=self.metadata)


class Output:
    """Whole lines on stdout from the main thread and the watcher alike."""

    def __init__(self):
        self.lock = threading.Lock()

    def line(self, text):
        with self.lock:
            print(text, flush=True)


class Watcher:
    """Prints the events of a WatchEvents stream and tells the main thread when one of a kind arrives."""

    def __init__(self, pb, call, out, wanted_kind):
        self.pb = pb
        self.call = call
        self.out = out
        self.wanted_kind = wanted_kind
        self.found = False
        self.error = None
        # Set when the wanted event arrives or the stream ends, whichever is first.
        self.settled = threading.Event()
        self.thread = threading.Thread(target=self.run, name="watch-events", daemon=True)

    def run(self):
        try:
            for event in self.call:
                self.out.line(f"event {self.pb.EventKind.Name(event.kind)}")
                if event.kind == self.wanted_kind:
                    self.found = True
                    self.settled.set()
            self.error = "WatchEvents ended before the expected event"
        except grpc.RpcError as e:
            self.error = f"WatchEvents failed: {e.code().name}: {e.details()}"
        finally:
            self.settled.set()

    def wait(self, deadline_s):
        if not self.settled.wait(deadline_s):
            raise Failure(f"no {self.pb.EventKind.Name(self.wanted_kind)} event within {deadline_s} s")
        if not self.found:
            raise Failure(self.error)

    def stop(self):
        self.call.cancel()
        self.thread.join(CALL_TIMEOUT_S)


def write_private(path, text):
    """Writes `text` to `path`, readable by its owner only (also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")


def provision(args, pb, control, out):
    run = f"run-{secrets.token_hex(4)}"
    tailnet = control(
        "CreateTailnet",
        pb.CreateTailnetRequest(
            name=run,
            owner=args.owner,
            ttl_seconds=3600,
            labels={"purpose": "provision-example"},
            policy_json=POLICY,
            upstreams=[
                pb.UpstreamConfig(
                    name="openai",
                    kind="openai",
                    base_url=args.upstream_url,
                    api_key=read_secret(args.upstream_key_file, "upstream API key"),
                )
            ],
        ),
    )
    out.line(f"tailnet {tailnet.id}")

    # What happened so far (the creation) from the audit log, then the stream from there on: WatchEvents
    # replays what came after `since_revision`, so nothing falls between the two.
    last_revision = 0
    page_token = ""
    while True:
        page = control(
            "ListAuditEvents", pb.ListAuditEventsRequest(tailnet_id=tailnet.id, page_token=page_token)
        )
        for event in page.events:
            out.line(f"event {pb.EventKind.Name(event.kind)}")
            last_revision = event.revision
        page_token = page.next_page_token
        if not page_token:
            break
    if last_revision == 0:
        raise Failure(f"the audit log has no events of the new tailnet {tailnet.id}")
    wanted = pb.EVENT_KIND_KEY_CREATED if args.keep else pb.EVENT_KIND_TAILNET_DELETED
    watcher = Watcher(
        pb, control.watch(pb.WatchEventsRequest(tailnet_id=tailnet.id, since_revision=last_revision)), out, wanted
    )
    watcher.thread.start()
    try:
        created = control(
            "CreateAuthKey",
            pb.CreateAuthKeyRequest(
                tailnet_id=tailnet.id,
                tags=["tag:agent"],
                # A runner's node goes away soon after it disconnects.
                ephemeral=True,
                expires_in_seconds=600,
                reason=f"agent of {run}",
            ),
        )
        out.line(f"key {created.key.id}")
        if args.keep:
            write_private(args.key_out, created.secret)
        else:
            control("DeleteTailnet", pb.DeleteTailnetRequest(id=tailnet.id, reason="provision example done"))
        watcher.wait(EVENT_DEADLINE_S)
    finally:
        watcher.stop()
    out.line("done")


def main():
    args = parse_args()
    try:
        pb, rpc = load_stubs(args.stubs)
        token = admin_token(args)
        with open_channel(args.server, args.ca_cert) as channel:
            provision(args, pb, Control(rpc.ControlStub(channel), token), Output())
    except Failure as e:
        print(f"provision.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
