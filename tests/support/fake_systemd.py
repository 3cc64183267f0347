#!/usr/bin/env python3
"""A stand-in for systemd, for baton's end-to-end tests.

Does for one service what systemd does, and records everything on stdout as
JSON lines, so a test can assert the exact sequence:

- socket activation: binds each --listen socket (port 0 allowed) and passes
  them with LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID (the service's pid);
- a notify socket (NOTIFY_SOCKET) that records every datagram with the
  sender's kernel-verified pid and the number of descriptors attached;
- the fd store: FDSTORE=1 / FDNAME= keep the attached descriptors,
  FDSTOREREMOVE=1 drops them; a restarted service gets them back after the
  socket-activation ones, named as stored (Restart= with
  FileDescriptorStoreMax=);
- WATCHDOG_USEC / WATCHDOG_PID when --watchdog-usec is given;
- --restarts N: restart the service when it exits, up to N times.

Events (one JSON object per line):
  {"event": "listening", "name": N, "address": A}
  {"event": "started", "pid": P, "fds": [names]}
  {"event": "notify", "pid": P, "message": M, "fds": K, "monotonic_us": T}
  {"event": "exited", "pid": P, "code": C, "signal": S}
  {"event": "done"}

SIGTERM is forwarded to the service (as systemctl stop does); once it has
exited and no restart is due, this exits. It never outlives --max-seconds.
"""

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def bind(spec):
    name, _, rest = spec.partition("=")
    opts = rest.split(",")
    addr = opts[0]
    reuseport = "reuseport" in opts[1:]
    if addr.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(addr[5:])
        shown = addr
    else:
        host, _, port = addr.rpartition(":")
        family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
        host = host.strip("[]")
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, int(port)))
        h, p = s.getsockname()[:2]
        shown = f"[{h}]:{p}" if family == socket.AF_INET6 else f"{h}:{p}"
    s.listen(128)
    emit(event="listening", name=name, address=shown)
    return name, s


def start(command, fds, notify_path, watchdog_usec):
    """Forks the service with `fds` (name, fd) as 3, 4, ...; returns its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            # Move every fd out of the 3.. range first, so no dup2 clobbers
            # one still to be placed.
            high = [os.dup(fd) for _, fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)
            env = dict(os.environ)
            for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(k, None)
            if fds:
                env["LISTEN_FDS"] = str(len(fds))
                env["LISTEN_FDNAMES"] = ":".join(n for n, _ in fds)
                env["LISTEN_PID"] = str(os.getpid())
            env["NOTIFY_SOCKET"] = notify_path
            if watchdog_usec:
                env["WATCHDOG_USEC"] = str(watchdog_usec)
                env["WATCHDOG_PID"] = str(os.getpid())
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execvpe(command[0], command, env)
        except BaseException as e:  # noqa: BLE001 - report anything, then die
            sys.stderr.write(f"fake-systemd: cannot start {command}: {e}\n")
        os._exit(127)
    emit(event="started", pid=pid, fds=[n for n, _ in fds])
    return pid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", action="append", default=[])
    ap.add_argument("--notify", required=True, help="notify socket path (or @abstract)")
    ap.add_argument("--watchdog-usec", type=int, default=0)
    ap.add_argument("--restarts", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    activated = [bind(s) for s in args.listen]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = args.notify
    notify.bind("\0" + path[1:] if path.startswith("@") else path)
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    store = []  # (name, fd) in the order stored

    stopping = False

    def on_term(_sig, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    deadline = time.monotonic() + args.max_seconds
    restarts = args.restarts
    pid = start(command, [(n, s.fileno()) for n, s in activated] + store, path, args.watchdog_usec)
    forwarded = False
    fd_size = struct.calcsize("i")
    creds_size = struct.calcsize("3i")
    while True:
        if stopping and not forwarded and pid:
            os.kill(pid, signal.SIGTERM)
            forwarded = True
        if time.monotonic() > deadline:
            if pid:
                os.kill(pid, signal.SIGKILL)
            stopping = True
        try:
            ready, _, _ = select.select([notify], [], [], 0.02)
        except InterruptedError:
            ready = []
        if ready:
            data, anc, _flags, _ = notify.recvmsg(
                4096, socket.CMSG_SPACE(creds_size) + socket.CMSG_SPACE(253 * fd_size)
            )
            sender, fds = None, []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("3i", payload[:creds_size])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // fd_size
                    fds.extend(struct.unpack(f"{n}i", payload[: n * fd_size]))
            message = data.decode(errors="replace")
            fields = dict(
                line.split("=", 1) for line in message.splitlines() if "=" in line
            )
            if fields.get("FDSTORE") == "1":
                name = fields.get("FDNAME", "stored")
                store.extend((name, fd) for fd in fds)
            else:
                for fd in fds:
                    os.close(fd)
            if fields.get("FDSTOREREMOVE") == "1":
                name = fields.get("FDNAME")
                for n, fd in [x for x in store if x[0] == name]:
                    os.close(fd)
                store = [x for x in store if x[0] != name]
            emit(
                event="notify",
                pid=sender,
                message=message,
                fds=len(fds),
                monotonic_us=time.monotonic_ns() // 1000,
            )
            continue
        if not pid:
            continue
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == 0:
            continue
        emit(
            event="exited",
            pid=pid,
            code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        )
        pid = 0
        if stopping or restarts <= 0:
            break
        restarts -= 1
        pid = start(
            command, [(n, s.fileno()) for n, s in activated] + store, path, args.watchdog_usec
        )
    emit(event="done")


if __name__ == "__main__":
    main()
