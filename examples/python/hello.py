#!/usr/bin/env python3
"""hello.py: the baton reference app in Python (standard library only).

Serves HTTP/1.1 on every socket-activation fd it receives (fds 3.. per
LISTEN_FDS when LISTEN_PID is our pid; TCP or Unix stream), or on
127.0.0.1:8080 (--listen) when run standalone. Sends READY=1 to NOTIFY_SOCKET.
On SIGTERM/SIGINT it drains: STOPPING=1, stop accepting, finish in-flight
requests, answer every request from then on with `Connection: close` (a busy
keep-alive client moves to a new connection after its next response and
never meets a connection closed under a request), close a keep-alive
connection only once it has been idle for a short grace (--idle-grace, 0:
at once), exit 0 (within ~5 s at worst).

    GET /        -> version=<v> generation=<BATON_GENERATION or 0> pid=<pid>
    GET /healthz -> ok

Version: --version-tag, else $APP_VERSION, else ./VERSION, else "dev".
"""

import argparse
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Worst-case time from the drain signal to exit.
DRAIN_CAP = 4.5
# How long a connection accepted just before the drain may take to send its
# first request: its client cannot know we are leaving, so closing it
# unanswered would be a failed request.
FIRST_REQUEST_GRACE = 2.0
# While draining, how long a keep-alive connection must have been idle
# before it is closed (--idle-grace).
IDLE_GRACE = 0.5


def log(msg):
    print(f"hello.py: {msg}", file=sys.stderr, flush=True)


def sd_notify(msg):
    """One datagram to NOTIFY_SOCKET; '@' means the abstract namespace."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(msg, path)
    except OSError as e:
        log(f"sd_notify failed: {e}")


def version(tag):
    if tag:
        return tag
    if os.environ.get("APP_VERSION", "").strip():
        return os.environ["APP_VERSION"].strip()
    try:
        with open("VERSION") as f:
            v = f.read().strip()
        if v:
            return v
    except OSError:
        pass
    return "dev"


def inherited_sockets():
    """Sockets passed with the systemd protocol, in order."""
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    if count and os.environ.get("LISTEN_PID") != str(os.getpid()):
        log("LISTEN_PID is not our pid, ignoring LISTEN_FDS")
        count = 0
    # Not meant for any child we might start.
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    socks = []
    for fd in range(3, 3 + count):
        s = socket.socket(fileno=fd)  # family and type are read from the fd
        s.set_inheritable(False)
        if s.type != socket.SOCK_STREAM:
            log(f"fd {fd} is not a stream socket, skipping")
            s.detach()
            continue
        socks.append(s)
    return socks


class Drain:
    """Connection bookkeeping shared by all servers, so a drain can close
    idle keep-alive connections and wait for busy ones."""

    NEW, BUSY, IDLE = "new", "busy", "idle"

    def __init__(self):
        self.cond = threading.Condition()
        self.draining = False
        self.idle_grace = IDLE_GRACE
        # connection socket -> [NEW (no request yet), BUSY or IDLE, since when]
        self.conns = {}

    def add(self, conn):
        with self.cond:
            self.conns[conn] = [self.NEW, time.monotonic()]

    def remove(self, conn):
        with self.cond:
            self.conns.pop(conn, None)
            self.cond.notify_all()

    def set_state(self, conn, state):
        with self.cond:
            if conn in self.conns:
                self.conns[conn] = [state, time.monotonic()]

    def _wake(self, state, idle_for=0.0):
        """Closes the connections in `state` for at least `idle_for` s.
        Returns how many in that state are left open."""
        # A blocked read on a shut-down socket sees EOF, so its handler closes it.
        left = 0
        now = time.monotonic()
        with self.cond:
            for conn, (s, since) in self.conns.items():
                if s != state:
                    continue
                if now - since < idle_for:
                    left += 1
                    continue
                try:
                    conn.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        return left

    def _close_idle(self):
        """Closes each keep-alive connection once it has been idle for the
        grace; a busy one ends with the `Connection: close` of its next
        response instead."""
        while True:
            with self.cond:
                if not self.conns:
                    return
            self._wake(self.IDLE, self.idle_grace)
            time.sleep(min(0.05, self.idle_grace))

    def start(self):
        """Marks draining; idle keep-alive connections are closed once idle
        for the grace (at once with a grace of 0); new ones (no request
        yet) get FIRST_REQUEST_GRACE to send theirs."""
        with self.cond:
            self.draining = True
        if self.idle_grace <= 0:
            self._wake(self.IDLE)
        else:
            threading.Thread(target=self._close_idle, daemon=True).start()
        timer = threading.Timer(FIRST_REQUEST_GRACE, self._wake, args=(self.NEW,))
        timer.daemon = True
        timer.start()

    def wait(self, deadline):
        with self.cond:
            while self.conns and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return len(self.conns)


DRAIN = Drain()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "hello.py"
    wbufsize = -1  # buffer headers + body into one send (flushed per request)
    root_body = b""  # set in main()

    def parse_request(self):
        # Request line read: this connection is busy until the response is out.
        DRAIN.set_state(self.request, Drain.BUSY)
        return super().parse_request()

    def handle_one_request(self):
        super().handle_one_request()
        # Not closed here even if the drain began meanwhile: the response
        # just sent may have said keep-alive, and the client may already be
        # sending its next request. That one is answered with `Connection:
        # close`; or the connection is closed once idle for the grace.
        DRAIN.set_state(self.request, Drain.IDLE)
        if DRAIN.draining and DRAIN.idle_grace <= 0:
            # The old drain (--idle-grace 0): close right after the request
            # during which the drain began, even if it was answered
            # keep-alive, so a client sending its next one meets the close.
            self.close_connection = True

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/":
            status, body = 200, self.root_body
        elif path == "/healthz":
            status, body = 200, b"ok\n"
        else:
            status, body = 404, b"not found\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if DRAIN.draining:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        pass  # no per-request logging: this app is benchmarked

    def address_string(self):
        # Unix-socket peers have no (host, port) tuple.
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"


class InheritedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on an already bound and listening socket."""

    daemon_threads = True
    block_on_close = False  # the drain logic waits, with a cap

    def __init__(self, sock):
        # Skip TCPServer.__init__: it would create and bind a new socket.
        socketserver.BaseServer.__init__(self, sock.getsockname(), Handler)
        self.socket = sock
        self.address_family = sock.family

    def process_request(self, request, client_address):
        DRAIN.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        DRAIN.remove(request)
        super().shutdown_request(request)


def main():
    ap = argparse.ArgumentParser(description="baton reference app (Python)")
    ap.add_argument("--version-tag")
    ap.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT when no fds are passed")
    ap.add_argument("--delay-ready", type=int, default=0, metavar="MS", help="sleep before serving")
    ap.add_argument(
        "--idle-grace",
        type=int,
        default=int(IDLE_GRACE * 1000),
        metavar="MS",
        help="while draining, close a keep-alive connection once idle this long (0: at once)",
    )
    args = ap.parse_args()
    DRAIN.idle_grace = args.idle_grace / 1000

    # Install handlers first so an early signal drains instead of killing us.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    socks = inherited_sockets()
    if not socks:
        host, _, port = args.listen.rpartition(":")
        socks = [socket.create_server((host.strip("[]"), int(port)))]

    v = version(args.version_tag)
    gen = os.environ.get("BATON_GENERATION", "0")
    Handler.root_body = f"version={v} generation={gen} pid={os.getpid()}\n".encode()

    if args.delay_ready and stop.wait(args.delay_ready / 1000):
        log("signalled before ready, exiting")
        return 0

    servers = [InheritedServer(s) for s in socks]
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    log(f"version={v} generation={gen} pid={os.getpid()} serving {len(servers)} listeners")
    sd_notify(b"READY=1\nSTATUS=serving")

    while not stop.wait(1):
        pass
    deadline = time.monotonic() + DRAIN_CAP
    log("draining")
    sd_notify(b"STOPPING=1")
    DRAIN.draining = True  # responses from now on carry Connection: close
    # Stop accepting: end the accept loops (in parallel), close our listener fds.
    stoppers = [threading.Thread(target=srv.shutdown) for srv in servers]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    for srv in servers:
        srv.server_close()
    DRAIN.start()
    log("stopped accepting; finishing open connections")
    left = DRAIN.wait(deadline)
    if left:
        log(f"drain cap reached with {left} connections open")
    log("drained, exiting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
