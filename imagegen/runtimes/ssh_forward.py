"""SSH to Docker hosts with the system ssh binary: one-off commands, and forwards this process opens and closes.

Every ssh run takes the same options: BatchMode (never a password prompt), keep-alives, and the file
IMAGEGEN_SSH_CONFIG names (`-F`; else ssh reads ~/.ssh/config as usual). A forward listens on this
machine only (127.0.0.1, or a unix socket in a private folder) and ends with this process: its ssh
runs a remote `cat` fed by our stdin, so when we exit, however we exit, ssh sees the end of its
input and leaves.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from imagegen.util.errors import ImagegenError

TARGET_RE = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@/:\s]+)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9_.\-]*|\[[0-9a-fA-F:]+\])"
                       r"(?::(?P<port>\d{1,5}))?/?$")


@dataclass(frozen=True)
class Target:
    """An SSH destination: [user@]host[:port] (or ssh://user@host:port)."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        match = TARGET_RE.match(text.strip())
        if not match:
            raise ImagegenError("invalid_argument", f"--hosts {text!r}: not an SSH host ([user@]host[:port])",
                                hint="Name hosts as box2, me@box3 or me@box3:2222, a Docker context, or local.")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise ImagegenError("invalid_argument", f"--hosts {text!r}: port {port} is out of range")
        return cls(match["host"].strip("[]"), match["user"], port)

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}" + (f":{self.port}" if self.port else "")

    def login(self) -> str:
        """The ssh command line a person types to reach this host."""
        user = f"{self.user}@" if self.user else ""
        return " ".join(["ssh", *(["-p", str(self.port)] if self.port else []), f"{user}{self.host}"])

    def argv(self) -> list[str]:
        """ssh's arguments naming this destination (after the options)."""
        return [*(["-l", self.user] if self.user else []), *(["-p", str(self.port)] if self.port else []),
                "--", self.host]


def ssh_binary() -> str:
    found = shutil.which(os.environ.get("IMAGEGEN_SSH") or "ssh")
    if not found:
        raise ImagegenError("ssh_unavailable", "no ssh client found on this machine",
                            hint="Install OpenSSH's client (apt-get install openssh-client), or drop --hosts.")
    return found


def ssh_options() -> list[str]:
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=5",
               "-o", "ServerAliveCountMax=3"]
    config = os.environ.get("IMAGEGEN_SSH_CONFIG", "").strip()
    return (["-F", config] if config else []) + options


def unreachable(target: Target, stderr: str) -> ImagegenError:
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "no answer")
    return ImagegenError("host_unreachable", f"cannot reach {target} over SSH: {last.strip()[:300]}",
                         hint=f"Check `{target.login()} docker info` works without a password prompt (an SSH key, "
                              f"a known host), then run `imagegen doctor --hosts {target}`.", host=str(target))


def run(target: Target, command: str, data: bytes | None = None, timeout: float = 60.0) -> str:
    """Run a shell command on the host; its stdout. Secrets travel on stdin (`data`), never in `command`."""
    try:
        done = subprocess.run([ssh_binary(), *ssh_options(), *target.argv(), command], input=data or b"",
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise unreachable(target, f"no answer within {timeout:.0f}s") from None
    if done.returncode == 255:
        raise unreachable(target, done.stderr.decode(errors="replace"))
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[-300:]
        raise ImagegenError("host_command_failed", f"on {target}: `{command[:80]}` failed with exit code "
                            f"{done.returncode}: {why}", host=str(target))
    return done.stdout.decode(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_private_dir: Path | None = None


def private_dir() -> Path:
    """A 0700 folder for this process's unix sockets (removed at exit)."""
    global _private_dir
    if _private_dir is None:
        _private_dir = Path(tempfile.mkdtemp(prefix="imagegen-ssh-"))
        atexit.register(shutil.rmtree, _private_dir, True)
    return _private_dir


class Forward:
    """`ssh -L LOCAL:REMOTE host`: REMOTE is 127.0.0.1:PORT or a unix socket path on the host; LOCAL is
    a free port on 127.0.0.1 (`url` then says where) or a unix socket in private_dir()."""

    def __init__(self, target: Target, remote: str, unix: bool = False):
        self.target, self.remote, self.unix = target, remote, unix
        self.process: subprocess.Popen | None = None
        self.local = ""

    @property
    def port(self) -> int:
        return int(self.local.rsplit(":", 1)[1])

    def open(self, timeout: float = 30.0) -> Forward:
        last = ""
        for _ in range(3):  # a port taken between our probe and ssh's bind: try another one
            self.local = str(private_dir() / f"{free_port()}.sock") if self.unix else f"127.0.0.1:{free_port()}"
            errors = tempfile.TemporaryFile()
            self.process = subprocess.Popen(
                [ssh_binary(), *ssh_options(), "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
                 "-o", "StreamLocalBindMask=0177", "-L", f"{self.local}:{self.remote}", *self.target.argv(),
                 "exec cat >/dev/null"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if self._listening():
                    _OPEN.add(self)
                    return self
                time.sleep(0.1)
            self.close()
            errors.seek(0)
            last = errors.read().decode(errors="replace") or f"the forward was not up within {timeout:.0f}s"
            errors.close()
            if "forward" not in last.lower() and "address already in use" not in last.lower():
                break
        raise unreachable(self.target, last)

    def _listening(self) -> bool:
        family = socket.AF_UNIX if self.unix else socket.AF_INET
        address = self.local if self.unix else ("127.0.0.1", self.port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(address)
                return True
            except OSError:
                return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        _OPEN.discard(self)
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.stdin:
                process.stdin.close()
            process.terminate()
            process.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
        if self.unix:
            Path(self.local).unlink(missing_ok=True)


_OPEN: set[Forward] = set()
_LOCK = threading.Lock()


@atexit.register
def close_all() -> None:
    """Every forward this process opened, closed (they would end with us anyway: this is quicker)."""
    with _LOCK:
        for forward in list(_OPEN):
            forward.close()
