"""Docker hosts over SSH (--hosts) through the real CLI: a real sshd in front of the real Docker engine.

The test starts its own OpenSSH server (a temporary host key, key-only, on a free loopback port) and
names it `root@127.0.0.1:PORT` next to `local`: both are the same Docker engine, so the test also
shows that the two hosts' containers are kept apart (host id and controller in labels and names).
The CLI runs as a non-root system user of its own (`imagegen-hosts-test`), so its containers are
told from anyone else's, and the model comes from the loopback hub (tests/hub_server.py). Tests run
in file order and share the workers they start; everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, docker_with_image, require
from hub_server import HubServer

from imagegen import __version__

pytestmark = [pytest.mark.docker, pytest.mark.sshd]

IMAGE = os.environ.get("IMAGEGEN_IMAGE", f"imagegen:{__version__}")
TEST_USER = "imagegen-hosts-test"
SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Sshd:
    """An OpenSSH server on 127.0.0.1:port, key-only, with a key the test made."""
    folder: Path
    port: int
    process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "sshd.log", "ab")  # noqa: SIM115 - kept by the process
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
                                        stdout=log, stderr=log)
        _wait_for(self._listening, 30, "sshd to listen")

    def _listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self) -> None:
        """The host drops: the server and every session it holds (the CLI's forwards with them)."""
        if self.process is None:
            return
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)
        self.process = None


def _make_sshd(folder: Path, user_uid: int) -> tuple[Sshd, Path]:
    """Keys, sshd_config, known_hosts and the client's ssh_config (passed with IMAGEGEN_SSH_CONFIG)."""
    folder.mkdir(mode=0o755)
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
    subprocess.run([*keygen, "-f", str(folder / "hostkey")], check=True)
    subprocess.run([*keygen, "-f", str(folder / "client")], check=True)
    os.chown(folder / "client", user_uid, -1)
    shutil.copyfile(folder / "client.pub", folder / "authorized_keys")
    (folder / "authorized_keys").chmod(0o600)
    port = _free_port()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder}/hostkey\nPidFile none\n"
        f"AuthorizedKeysFile {folder}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        "AllowTcpForwarding yes\nAllowStreamLocalForwarding yes\nX11Forwarding no\n")
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {(folder / 'hostkey.pub').read_text()}")
    config = folder / "ssh_config"
    config.write_text(f"Host *\n  IdentityFile {folder}/client\n  IdentitiesOnly yes\n"
                      f"  UserKnownHostsFile {folder}/known_hosts\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    return Sshd(folder, port), config


@dataclass
class Hosts:
    uid: int
    gid: int
    python: str
    base: Path
    sshd: Sshd
    hub: HubServer
    client: object
    ssh_config: Path
    state: dict = field(default_factory=dict)

    @property
    def remote(self) -> str:
        return f"root@127.0.0.1:{self.sshd.port}"

    @property
    def home(self) -> Path:
        return self.base / "imagegen-home"

    @property
    def remote_dir(self) -> Path:
        return self.base / "remote"

    def env(self, extra: dict | None = None) -> dict:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "DOCKER_HOST", "TMPDIR", "CI")}
        return {**keep, "HOME": str(self.base / "user-home"), "IMAGEGEN_HOME": str(self.home),
                "IMAGEGEN_KEEP_WARM": "900", "PYTHONDONTWRITEBYTECODE": "1",
                "IMAGEGEN_SSH_CONFIG": str(self.ssh_config),
                "IMAGEGEN_HOSTS_DIR": str(self.remote_dir), "IMAGEGEN_HOSTS_FETCH_NETWORK": "host",
                "HF_ENDPOINT": self.hub.url, **(extra or {})}

    def command(self, args) -> list[str]:
        socket_gid = Path("/var/run/docker.sock").stat().st_gid
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", f"--groups={socket_gid}", "--",
                self.python, str(REPO / "generate_image.py"), *args]

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 600):
        return subprocess.run(self.command(args), capture_output=True, env=self.env(), input=input, timeout=timeout,
                              cwd=str(self.base))

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env(), cwd=str(self.base))

    def ours(self, all_states: bool = True):
        """Every container this test's user started, on either host (workers and fetches)."""
        found = {}
        for label in ("imagegen.worker=1", "imagegen.worker=ssh", "imagegen.fetch=1"):
            for container in self.client.containers.list(
                    all=all_states, filters={"label": [label, f"imagegen.owner_uid={self.uid}"]}):
                found[container.id] = container
        return list(found.values())

    def remove_ours(self) -> None:
        for container in self.ours():
            try:
                container.remove(force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


@pytest.fixture(scope="module")
def hosts(tiny_sd15):
    require(os.getuid() == 0, "the SSH host tests start sshd and a test user: they run as root")
    require(Path(SSHD).is_file(), "OpenSSH's server is not installed (apt-get install openssh-server)")
    require(all(shutil.which(tool) for tool in ("ssh", "ssh-keygen", "setpriv")), "ssh, ssh-keygen or setpriv missing")
    client = docker_with_image(IMAGE)
    from test_docker import _test_user, _test_user_python

    uid, gid = _test_user(TEST_USER)
    python = _test_user_python()
    base = Path(tempfile.mkdtemp(prefix="imagegen-hosts-test-"))
    base.chmod(0o755)
    for name in ("user-home", "imagegen-home", "out"):
        (base / name).mkdir()
        os.chown(base / name, uid, gid)
    sshd, ssh_config = _make_sshd(base / "ssh", uid)
    data = tiny_sd15.read_bytes()
    with HubServer() as hub:
        sha = hub.add("org/tiny", "tiny-sd15.safetensors", data)
        (base / "imagegen-home" / "models.yaml").write_text(
            "schema: 1\nmodels:\n  tiny:\n    family: sd15\n    files:\n      checkpoint:\n"
            "        repo: org/tiny\n        file: tiny-sd15.safetensors\n        revision: main\n"
            f"        folder: checkpoints\n        size: {len(data)}\n        sha256: {sha}\n")
        os.chown(base / "imagegen-home" / "models.yaml", uid, gid)
        box = Hosts(uid=uid, gid=gid, python=python, base=base, sshd=sshd, hub=hub, client=client,
                    ssh_config=ssh_config)
        box.remove_ours()
        sshd.start()
        try:
            yield box
        finally:
            box.remove_ours()
            sshd.kill()
            shutil.rmtree(base, ignore_errors=True)


def _batch(hosts: Hosts, out: Path, prompts: list[str], *extra: str):
    lines = "".join(f"{prompt}\n" for prompt in prompts).encode()
    return hosts.cli("batch", "-o", str(out), "-m", "tiny", "--size", "64x64", "--steps", "2", "--json",
                     "--hosts", f"local,{hosts.remote}", *extra, input=lines)


def _manifest(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# --- a batch over both hosts; the model fetched on each, once ---------------------------------
def test_a_batch_spreads_over_local_and_the_ssh_host_and_each_host_fetches_the_model_once(hosts):
    out = hosts.base / "out" / "spread"
    prompts = [f"a robot number {n}" for n in range(8)]
    result = _batch(hosts, out, prompts)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    lines = [line for line in _manifest(out) if line["status"] == "done"]
    assert len(lines) == len(prompts) and len({line["path"] for line in lines}) == len(prompts)
    workers = {line["worker"] for line in lines}
    assert any(name.startswith("imagegen-ssh-") for name in workers), workers
    assert any(not name.startswith("imagegen-ssh-") for name in workers), workers
    # The model was downloaded twice: once into this machine's cache, once on the host by a one-off container.
    assert len(hosts.hub.gets()) == 2
    remote_copy = hosts.remote_dir / "models" / "checkpoints" / "tiny-sd15.safetensors"
    assert remote_copy.stat().st_uid != 0  # written by the container's non-root user
    assert (hosts.home / "models" / "checkpoints" / "tiny-sd15.safetensors").is_file()
    assert not [c for c in hosts.client.containers.list(all=True, filters={"label": "imagegen.fetch=1"})
                if c.labels.get("imagegen.owner_uid") == str(hosts.uid)]  # the fetch container is gone
    # A second batch finds both copies: nothing more is downloaded, and the warm workers are reused.
    again = _batch(hosts, hosts.base / "out" / "again", ["a robot again"])
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert len(hosts.hub.gets()) == 2
    assert "starting a Docker worker" not in again.stderr.decode()


def test_generate_on_the_ssh_host_reuses_its_warm_worker(hosts):
    target = hosts.base / "out" / "one.png"
    result = hosts.cli("generate", "a lighthouse", "-m", "tiny", "--size", "64x64", "--steps", "2", "--json",
                       "-o", str(target), "--hosts", hosts.remote)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    record = json.loads(result.stdout.decode())
    assert record["worker"].startswith("imagegen-ssh-") and target.is_file()
    assert "starting a Docker worker" not in result.stderr.decode()


def test_a_batch_smaller_than_the_gpus_runs_where_the_model_is_and_fetches_nothing_on_the_other_host(hosts, tiny_sd15):
    """The SSH host is named first, but only this machine will hold the new model: the one job goes here."""
    raw = tiny_sd15.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = {**json.loads(raw[8:8 + size]), "__metadata__": {"copy": "here"}}  # another file: another model
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + raw[8 + size:]
    sha = hosts.hub.add("org/tiny", "tiny-here.safetensors", data)
    yaml = hosts.home / "models.yaml"
    yaml.write_text(yaml.read_text() + "  tiny-here:\n    family: sd15\n    files:\n      checkpoint:\n"
                    "        repo: org/tiny\n        file: tiny-here.safetensors\n        revision: main\n"
                    f"        folder: checkpoints\n        size: {len(data)}\n        sha256: {sha}\n")
    before = len(hosts.hub.gets())
    out = hosts.base / "out" / "where-the-model-is"
    result = hosts.cli("batch", "-o", str(out), "-m", "tiny-here", "--size", "64x64", "--steps", "2", "--json",
                       "--hosts", f"{hosts.remote},local", input=b"a robot at home\n")
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    [line] = _manifest(out)
    assert line["status"] == "done" and not line["worker"].startswith("imagegen-ssh-"), line
    assert len(hosts.hub.gets()) == before + 1  # this machine's copy only
    assert not (hosts.remote_dir / "models" / "checkpoints" / "tiny-here.safetensors").exists()


def test_a_funnel_runs_on_the_ssh_host_drafts_then_img2img_from_the_pick(hosts):
    out = hosts.base / "out" / "funnel"
    result = hosts.cli("funnel", "run", "a lighthouse", "-o", str(out), "--draft-model", "tiny",
                       "--refine-model", "tiny", "--polish-model", "none", "--upscale-model", "none",
                       "--drafts", "2", "--keep", "1", "--auto", "--size", "64x64", "--steps", "2", "--json",
                       "--hosts", hosts.remote)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = [json.loads(line) for line in result.stdout.decode().splitlines() if line.strip()]
    images = [r for r in records if r.get("path")]
    assert len(images) >= 3 and all(r["worker"].startswith("imagegen-ssh-") for r in images), records
    assert all(Path(r["path"]).is_file() for r in images)


def test_the_remote_workers_are_kept_apart_and_their_secret_is_not_in_docker_inspect(hosts):
    remote = [c for c in hosts.ours(all_states=False) if c.labels.get("imagegen.worker") == "ssh"]
    local = [c for c in hosts.ours(all_states=False) if c.labels.get("imagegen.worker") == "1"]
    assert len(remote) == 1 and len(local) == 1
    (container,) = remote
    assert container.name.startswith(f"imagegen-ssh-{container.labels['imagegen.host']}-")
    token_files = list((hosts.home / "state" / "workers").glob("ssh-*-cpu.token"))
    assert len(token_files) == 1
    token = token_files[0].read_text().strip()
    assert stat.S_IMODE(token_files[0].stat().st_mode) == 0o600
    config = container.attrs["Config"]
    for part in (config.get("Env") or [], config.get("Labels") or {}, config.get("Cmd") or [],
                 container.attrs.get("Args") or [], container.attrs):
        assert token not in json.dumps(part)
    # On the host the secret is a 0600 file of the workers' (non-root) user, mounted read-only.
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    secret = Path(mounts["/run/imagegen/token"]["Source"])
    assert mounts["/run/imagegen/token"]["RW"] is False
    assert secret.is_relative_to(hosts.remote_dir) and secret.read_text().strip() == token
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.stat().st_uid == int(config["User"].split(":")[0])
    assert not config["User"].startswith("0")
    # Published on the host's loopback only; this machine reaches it through a forward.
    bindings = container.attrs["NetworkSettings"]["Ports"]["8188/tcp"]
    assert {binding["HostIp"] for binding in bindings} == {"127.0.0.1"}
    listed = hosts.cli("workers", "--hosts", f"local,{hosts.remote}", "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    records = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    assert {r["host"] for r in records} == {"local", hosts.remote} and all(r["healthy"] for r in records)


# --- faults ---------------------------------------------------------------------------------
def test_a_host_that_drops_mid_batch_has_its_jobs_finished_on_the_other_host(hosts):
    out = hosts.base / "out" / "cut"
    prompts = [f"a cut robot {n}" for n in range(14)]
    (hosts.base / "cut.txt").write_text("".join(f"{p}\n" for p in prompts))
    process = hosts.popen("batch", str(hosts.base / "cut.txt"), "-o", str(out), "-m", "tiny", "--size", "64x64",
                          "--steps", "2", "--json", "--hosts", f"local,{hosts.remote}")
    try:
        _wait_for(lambda: any(line["worker"].startswith("imagegen-ssh-") for line in _manifest(out)), 300,
                  "an image from the SSH host")
        hosts.sshd.kill()  # the host drops: sshd and every connection through it
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
        if hosts.sshd.process is None:
            hosts.sshd.start()
    assert process.returncode == 0, stderr.decode()[-3000:]
    lines = _manifest(out)
    done = [line for line in lines if line["status"] == "done"]
    assert sorted(line["key"] for line in done) == sorted({line["key"] for line in done})  # each image once
    assert len(done) == len(prompts) == len(lines)
    assert all(Path(line["path"]).is_file() for line in done)
    assert any(not line["worker"].startswith("imagegen-ssh-") for line in done)
    said = stderr.decode()
    assert "its jobs go to other workers" in said or "could not start" in said, said[-3000:]


def test_doctor_reports_a_host_that_does_not_answer_with_the_next_step(hosts):
    closed = f"root@127.0.0.1:{_free_port()}"
    result = hosts.cli("doctor", "--hosts", f"{hosts.remote},{closed}", "--json", timeout=120)
    checks = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 1
    mine = {c["check"]: c for c in checks if c.get("host") == hosts.remote}
    assert mine["ssh"]["ok"] and mine["docker"]["ok"] and mine["image"]["ok"], mine
    theirs = [c for c in checks if c.get("host") == closed]
    assert [c["check"] for c in theirs] == ["ssh"] and not theirs[0]["ok"]
    assert f"ssh {closed}" in theirs[0]["fix"] or "ssh -p" in theirs[0]["fix"]


def test_image_push_sends_the_image_over_ssh_and_skips_a_host_that_has_it(hosts):
    import io
    import tarfile

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    tag = "imagegen-push-test:1"
    hosts.client.api.import_image_from_data(payload.getvalue(), repository="imagegen-push-test", tag="1")
    try:
        sent = hosts.cli("image", "push", hosts.remote, "--image", tag, "--force", "--json", timeout=300)
        assert sent.returncode == 0, sent.stderr.decode()
        record = json.loads(sent.stdout.decode())
        assert record["pushed"] and record["bytes"] > 0 and record["host"] == hosts.remote
        again = hosts.cli("image", "push", hosts.remote, "--image", tag, "--json", timeout=300)
        assert again.returncode == 0 and json.loads(again.stdout.decode())["pushed"] is False
    finally:
        hosts.client.images.remove(tag, force=True)


def test_keep_warm_0_removes_the_container_it_started_and_leaves_one_it_reused(hosts):
    _wait_for(lambda: hosts.sshd._listening(), 30, "sshd")
    draw = ("generate", "a lighthouse", "-m", "tiny", "--size", "64x64", "--steps", "1", "--json")
    warm = hosts.cli(*draw, "-o", str(hosts.base / "out" / "warm.png"), "--hosts", "local")
    assert warm.returncode == 0, warm.stderr.decode()[-3000:]
    cleared = hosts.cli("stop", "--all", "--hosts", hosts.remote, "--json")
    assert cleared.returncode == 0, cleared.stderr.decode()
    local_before = {c.id for c in hosts.ours(all_states=False) if c.labels.get("imagegen.worker") == "1"}
    assert len(local_before) == 1
    started = hosts.cli(*draw, "--keep-warm", "0", "-o", str(hosts.base / "out" / "k0.png"), "--hosts", hosts.remote)
    assert started.returncode == 0, started.stderr.decode()[-3000:]
    assert "starting a Docker worker" in started.stderr.decode()
    assert [c.name for c in hosts.ours() if c.labels.get("imagegen.worker") == "ssh"] == [], "left on the SSH host"
    reused = hosts.cli(*draw, "--keep-warm", "0", "-o", str(hosts.base / "out" / "k0b.png"), "--hosts", "local")
    assert reused.returncode == 0, reused.stderr.decode()[-3000:]
    assert "starting a Docker worker" not in reused.stderr.decode()
    assert {c.id for c in hosts.ours(all_states=False) if c.labels.get("imagegen.worker") == "1"} == local_before


def test_stop_all_leaves_no_container_on_either_host(hosts):
    """Its own workers first (earlier tests' are reused when they ran, so it holds alone too)."""
    _wait_for(lambda: hosts.sshd._listening(), 30, "sshd")
    started = _batch(hosts, hosts.base / "out" / "before-stop", ["a robot to stop", "another robot to stop"])
    assert started.returncode == 0, started.stderr.decode()[-3000:]
    running = {c.labels.get("imagegen.worker"): c.name for c in hosts.ours(all_states=False)}
    assert set(running) == {"1", "ssh"}, f"no worker on each host to stop: {running}"
    result = hosts.cli("stop", "--all", "--hosts", f"local,{hosts.remote}", "--json")
    assert result.returncode == 0, result.stderr.decode()
    stopped = " ".join(json.loads(result.stdout.decode())["stopped"])
    assert all(name in stopped for name in running.values()), (stopped, running)
    assert hosts.ours() == []


def test_a_worker_whose_owner_is_gone_is_reaped_on_the_host_by_the_next_run(hosts):
    """A container left starting by a killed command is removed by the next call; others' are not."""
    other = hosts.client.containers.run(IMAGE, ["600"], detach=True, entrypoint=["sleep"],
                                        labels={"imagegen.worker": "ssh", "imagegen.owner_uid": str(hosts.uid + 1)})
    try:
        env = {"IMAGEGEN_START_TIMEOUT": "1"}  # the stale container's start timeout has passed
        stale = hosts.client.containers.create(
            IMAGE, ["600"], entrypoint=["sleep"],
            labels={"imagegen.worker": "ssh", "imagegen.owner_uid": str(hosts.uid), "imagegen.owner_pid": "999999",
                    "imagegen.started": "1", "imagegen.slot": "cpu", "imagegen.host": _host_id(hosts),
                    "imagegen.controller": _controller(hosts)})
        fetch = hosts.client.containers.create(
            IMAGE, ["600"], entrypoint=["sleep"],
            labels={"imagegen.fetch": "1", "imagegen.owner_uid": str(hosts.uid), "imagegen.owner_pid": "999999",
                    "imagegen.host": _host_id(hosts), "imagegen.controller": _controller(hosts)})
        listed = subprocess.run(hosts.command(["workers", "--hosts", hosts.remote, "--json"]), capture_output=True,
                                env=hosts.env(env), timeout=300)
        assert listed.returncode == 0, listed.stderr.decode()
        assert stale.id not in {c.id for c in hosts.ours()} and fetch.id not in {c.id for c in hosts.ours()}
        other.reload()
        assert other.status == "running"
    finally:
        other.remove(force=True)


def _host_id(hosts: Hosts) -> str:
    import hashlib

    return hashlib.sha256(hosts.remote.encode()).hexdigest()[:8]


def _controller(hosts: Hosts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{hosts.uid}")[:63]
