"""The Docker runtime through the real CLI, against a real Docker engine and the worker image.

scripts/setup-docker.sh starts the engine and builds imagegen:<VERSION> (./build-image.sh --cpu-local).
The CLI runs as a non-root user (a system user `imagegen-test` when the tests run as root; it gets
the Docker socket's group as a supplementary group, and a small venv of its own because root's
interpreter is not readable by other users), so "owned by the invoking user" means something.
Tests run in file order and share one warm worker where they can; every container they start
belongs to that user (label imagegen.owner_uid) and is removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, docker_with_image, require

from imagegen import __version__
from imagegen.comfy import png

pytestmark = pytest.mark.docker

IMAGE = os.environ.get("IMAGEGEN_IMAGE", f"imagegen:{__version__}")
BROKEN_IMAGE = "imagegen:broken-test"
TEST_USER = "imagegen-test"
TEST_VENVS = Path("/var/tmp/imagegen-docker-test")   # world-readable: root's venv under /root is not
OOM_LIMIT = "800m"   # ComfyUI starts in ~0.6 GB here; loading the tiny SD1.5 checkpoint needs ~1.4 GB


def _socket_path() -> Path | None:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return Path(host[len("unix://"):]) if host.startswith("unix://") else None


@dataclass
class Box:
    """Who runs the CLI, with which interpreter, and where its files go."""
    uid: int
    gid: int
    python: str
    base: Path                      # a world-readable temp dir: checkpoint, outputs, HOME, IMAGEGEN_HOME
    checkpoint: Path
    socket_gid: int | None
    client: object
    state: dict = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.base / "imagegen-home"

    def prefix(self, docker_group: bool = True) -> list[str]:
        if os.getuid() != 0:
            return []
        groups = f"--groups={self.socket_gid}" if docker_group and self.socket_gid is not None else "--clear-groups"
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", groups, "--"]

    def env(self, extra: dict | None = None) -> dict:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "DOCKER_HOST", "TMPDIR", "CI")}
        return {**keep, "HOME": str(self.base / "user-home"), "IMAGEGEN_HOME": str(self.home),
                "IMAGEGEN_KEEP_WARM": "900", "PYTHONDONTWRITEBYTECODE": "1", **(extra or {})}

    def command(self, args, docker_group: bool = True) -> list[str]:
        return [*self.prefix(docker_group), self.python, str(REPO / "generate_image.py"), *args]

    def cli(self, *args: str, env: dict | None = None, docker_group: bool = True, timeout: float = 300):
        return subprocess.run(self.command(args, docker_group), capture_output=True, env=self.env(env),
                              timeout=timeout, cwd=str(self.base))

    def popen(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(self.command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self.env(env), cwd=str(self.base))

    def generate(self, *args: str, env: dict | None = None, **kwargs):
        return self.cli("generate", "a friendly robot", "--runtime", "docker", "--checkpoint", str(self.checkpoint),
                        "--size", "64x64", "--steps", "2", *args, env=env, **kwargs)

    def containers(self):
        return self.client.containers.list(all=True,
                                           filters={"label": ["imagegen.worker=1", f"imagegen.owner_uid={self.uid}"]})

    def token(self) -> str:
        return (self.home / "state" / "workers" / "docker-cpu.token").read_text().strip()


def error_of(result) -> dict:
    lines = result.stderr.decode().strip().splitlines()
    assert lines, "no error on stderr"
    return json.loads(lines[-1])


# --- setup ----------------------------------------------------------------------------
def _test_user(name: str = TEST_USER) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
        require(made.returncode == 0, f"cannot create the test user {name}: {made.stderr.strip()}")
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _test_user_python() -> str:
    """A venv with imagegen's host-side dependencies, readable by the test user (imagegen itself
    is imported from the checkout: generate_image.py puts it first on sys.path)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    base_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    require(base_python is not None, "no system python3 for the test user's venv")
    stamp = hashlib.sha256("\n".join([base_python, *deps]).encode()).hexdigest()[:12]
    venv = TEST_VENVS / f"venv-{stamp}"
    python = venv / "bin" / "python"
    works = (venv / ".complete").exists() and subprocess.run([str(python), "-c", "import docker, typer, requests"],
                                                             capture_output=True).returncode == 0
    if not works:
        TEST_VENVS.mkdir(parents=True, exist_ok=True)
        TEST_VENVS.chmod(0o755)
        shutil.rmtree(venv, ignore_errors=True)
        made = subprocess.run([base_python, "-m", "venv", str(venv)], capture_output=True, text=True)
        require(made.returncode == 0, f"cannot create the test user's venv: {made.stderr.strip()[-500:]}")
        installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *deps],
                                   capture_output=True, text=True, timeout=600)
        require(installed.returncode == 0,
                f"cannot install imagegen's dependencies for the test user: {installed.stderr.strip()[-800:]}")
        (venv / ".complete").touch()
    return str(python)


def _remove_containers(client, uid: int) -> None:
    for container in client.containers.list(all=True,
                                            filters={"label": ["imagegen.worker=1", f"imagegen.owner_uid={uid}"]}):
        try:
            container.remove(force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


@pytest.fixture(scope="module")
def box(tiny_sd15):
    client = docker_with_image(IMAGE)

    sock = _socket_path()
    socket_gid = sock.stat().st_gid if sock and sock.exists() else None
    if os.getuid() == 0:
        require(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to run the CLI as a non-root user")
        uid, gid = _test_user()
        python = _test_user_python()
    else:
        uid, gid, python = os.getuid(), os.getgid(), sys.executable
    base = Path(tempfile.mkdtemp(prefix="imagegen-docker-test-"))
    base.chmod(0o755)
    (base / "checkpoints").mkdir(mode=0o755)
    checkpoint = base / "checkpoints" / "tiny-sd15.safetensors"
    shutil.copyfile(tiny_sd15, checkpoint)
    checkpoint.chmod(0o644)
    for name in ("user-home", "imagegen-home", "out"):
        (base / name).mkdir()
        os.chown(base / name, uid, gid)
    _remove_containers(client, uid)
    box = Box(uid=uid, gid=gid, python=python, base=base, checkpoint=checkpoint, socket_gid=socket_gid, client=client)
    probe = box.cli("version")
    require(probe.returncode == 0, f"the CLI does not run as uid {uid}: {probe.stderr.decode()[-500:]}")
    yield box
    _remove_containers(client, uid)
    try:
        client.images.remove(BROKEN_IMAGE, force=True)
    except Exception:  # noqa: BLE001 - not built
        pass
    shutil.rmtree(base, ignore_errors=True)


# --- the warm worker: ownership, loopback, the secret, reuse ------------------------------
def test_generate_renders_a_png_owned_by_the_invoking_user(box):
    target = box.base / "out" / "cold.png"
    started = time.monotonic()
    result = box.generate("--size", "64x96", "--seed", "7", "--json", "-o", str(target))
    box.state["cold_seconds"] = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode()
    assert "starting a Docker worker" in result.stderr.decode()
    record = json.loads(result.stdout.decode())
    assert record["path"] == str(target) and record["seed"] == 7
    data = target.read_bytes()
    assert png.png_size(data) == (64, 96)
    assert target.stat().st_uid == box.uid and target.stat().st_gid == box.gid

    (container,) = box.containers()
    box.state["container"] = container.id
    assert container.status == "running"
    assert container.attrs["Config"]["User"] == f"{box.uid}:{box.gid}"
    assert container.attrs["HostConfig"]["Init"] is True
    assert container.labels["imagegen.owner_uid"] == str(box.uid)
    # Every process in the container runs as the invoking user...
    top = container.top(ps_args="-eo pid,uid,args")
    uid_column = top["Titles"].index("UID")
    assert {int(p[uid_column]) for p in top["Processes"]} == {box.uid}, top
    # ... so what it writes into the shared model cache belongs to that user too.
    written = container.exec_run(["/opt/venv/bin/python3", "-c",
                                  "open('/models/written-by-the-worker', 'w').write('x')"])
    assert written.exit_code == 0, written.output
    cached = box.home / "models" / "written-by-the-worker"
    assert cached.stat().st_uid == box.uid and cached.stat().st_gid == box.gid


def test_a_second_generate_reuses_the_warm_worker_and_is_faster(box):
    started = time.monotonic()
    result = box.generate("--seed", "8", "-o", str(box.base / "out" / "warm.png"))
    warm_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr.decode()
    assert "starting a Docker worker" not in result.stderr.decode()
    assert [c.id for c in box.containers()] == [box.state["container"]]
    assert warm_seconds < box.state["cold_seconds"] * 0.6, (box.state["cold_seconds"], warm_seconds)
    assert (box.base / "out" / "warm.png").stat().st_uid == box.uid


def test_fast_mode_compiles_in_the_container_and_keeps_the_kernels_in_the_model_cache(box):
    """The image carries the compiler and headers torch.compile needs; the compiled kernels land in
    the mounted model cache (owned by the user), so they outlive the container."""
    target = box.base / "out" / "fast.png"
    result = box.generate("--seed", "8", "--fast", "--json", "-o", str(target), env={"IMAGEGEN_FAST_ON_CPU": "1"},
                          timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout.decode())["fast"] is True and target.stat().st_uid == box.uid
    cache = box.home / "models" / ".compile-cache" / "inductor"
    files = [path for path in cache.rglob("*") if path.is_file()]
    assert files and all(path.stat().st_uid == box.uid for path in files)


def test_workers_lists_the_docker_worker(box):
    result = box.cli("workers", "--runtime", "docker", "--json")
    assert result.returncode == 0, result.stderr.decode()
    (record,) = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert record["runtime"] == "docker" and record["slot"] == "cpu" and record["device"] == "cpu"
    assert record["container"] == box.state["container"][:12]
    assert record["url"].startswith("http://127.0.0.1:")
    assert record["last_model"] and "tiny-sd15" in record["last_model"]
    box.state["url"] = record["url"]


def _listeners(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6} (state 0A = LISTEN)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address if len(address) == width else "?")
    return found


def test_the_port_is_published_on_loopback_only(box):
    container = box.client.containers.get(box.state["container"])
    bindings = container.attrs["NetworkSettings"]["Ports"]["8188/tcp"]
    assert bindings and {b["HostIp"] for b in bindings} == {"127.0.0.1"}, bindings
    assert all(key == "8188/tcp" or not value for key, value in container.attrs["NetworkSettings"]["Ports"].items())
    port = int(bindings[0]["HostPort"])
    assert box.state["url"] == f"http://127.0.0.1:{port}"
    listeners = _listeners(port)
    assert listeners, f"nothing listens on port {port}"
    assert set(listeners) == {"0100007F"}, f"port {port} listens on {listeners}: only 127.0.0.1 (0100007F) is allowed"
    # And the host's other addresses (eth0, docker0, ...) do not reach it.
    for address in _host_addresses():
        with socket.socket() as probe:
            probe.settimeout(3)
            assert probe.connect_ex((address, port)) != 0, f"{address}:{port} accepts connections"


def _host_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback (`ip -o -4 addr`)."""
    try:
        listing = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return []
    addresses = [line.split()[3].split("/")[0] for line in listing.splitlines() if len(line.split()) > 3]
    return [a for a in addresses if not a.startswith("127.")]


def test_requests_without_the_secret_are_refused(box):
    import requests
    import websocket

    url, token = box.state["url"], box.token()
    assert requests.get(f"{url}/imagegen/health", timeout=10).status_code == 200   # the only open path
    graph = {"prompt": {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}}}}
    for headers in ({}, {"Authorization": "Bearer wrong-secret"}, {"Authorization": token},
                    {"Origin": "http://evil.example", "Authorization": "Bearer "}):
        assert requests.get(f"{url}/system_stats", headers=headers, timeout=10).status_code == 401, headers
        assert requests.post(f"{url}/prompt", json=graph, headers=headers, timeout=10).status_code == 401, headers
        assert requests.get(f"{url}/queue", headers=headers, timeout=10).status_code == 401, headers
    assert requests.options(f"{url}/prompt", headers={"Origin": "http://evil.example",
                                                      "Access-Control-Request-Method": "POST"},
                                                      timeout=10).status_code in (401, 403)
    ws_url = "ws" + url[len("http"):] + "/ws?clientId=probe"
    for header in ([], ["Authorization: Bearer wrong-secret"]):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(ws_url, header=header, timeout=10)
        assert refused.value.status_code == 401
    # The owner gets through: the same requests with the secret work.
    right = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{url}/system_stats", headers=right, timeout=10).status_code == 200
    websocket.create_connection(ws_url, header=[f"Authorization: Bearer {token}"], timeout=10).close()


def test_the_secret_is_not_in_docker_inspect(box):
    token = box.token()
    container = box.client.containers.get(box.state["container"])
    assert token not in json.dumps(container.attrs)
    config = container.attrs["Config"]
    for part in (config.get("Env") or [], config.get("Labels") or {}, config.get("Cmd") or [],
                 container.attrs.get("Args") or []):
        assert token not in json.dumps(part)
    inspected = subprocess.run(["docker", "inspect", container.id], capture_output=True, text=True)
    if inspected.returncode == 0:
        assert token not in inspected.stdout
    # It is in a 0600 file of the invoking user, mounted read-only.
    token_file = box.home / "state" / "workers" / "docker-cpu.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.stat().st_uid == box.uid
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/run/imagegen/token"]["RW"] is False


def test_a_checkpoint_is_mounted_as_the_file_not_its_folder(box):
    container = box.client.containers.get(box.state["container"])
    binds = {m["Destination"]: m for m in container.attrs["Mounts"] if m["Type"] == "bind"}
    assert str(box.checkpoint) in binds and binds[str(box.checkpoint)]["RW"] is False, binds
    assert not any(str(box.checkpoint.parent) == dest or str(box.base) == dest for dest in binds), binds
    listing = container.exec_run(["ls", str(box.checkpoint.parent)])
    assert listing.output.decode().split() == [box.checkpoint.name], "only the file shows, not its neighbours"


def test_a_second_checkpoint_folder_starts_a_worker_beside_the_first_and_never_removes_it(box):
    other = box.base / "other-folder" / "tiny-copy.safetensors"
    other.parent.mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(box.checkpoint, other)
    other.chmod(0o644)
    first = box.state["container"]
    result = box.cli("generate", "a friendly robot", "--runtime", "docker", "--checkpoint", str(other), "--size",
                     "64x64",
                     "--steps", "2", "-o", str(box.base / "out" / "other.png"))
    assert result.returncode == 0, result.stderr.decode()
    running = {c.id: c for c in box.containers() if c.status == "running"}
    assert first in running, "the first worker (another command may be using it) was removed"
    (second,) = [c for c in running.values() if c.id != first]
    assert json.loads(second.labels["imagegen.mounts"]) == [str(other)]
    again = box.generate("-o", str(box.base / "out" / "first-again.png"))
    assert again.returncode == 0, again.stderr.decode()
    assert "starting a Docker worker" not in again.stderr.decode(), "the first worker fits and is reused"
    assert {c.id for c in box.containers()} == set(running)
    second.remove(force=True)


def test_a_lora_and_a_controlnet_reach_a_docker_worker(box):
    """Local LoRA/ControlNet files are mounted read-only like a checkpoint; the worker's ComfyUI finds them in
    its loras and controlnet folders, applies every LoRA key and runs the Canny node."""
    from PIL import Image, ImageDraw

    addons_dir = box.base / "addons"
    addons_dir.mkdir(mode=0o755, exist_ok=True)
    lora, controlnet, edges = addons_dir / "lora.safetensors", addons_dir / "cn.safetensors", addons_dir / "edges.png"
    for kind, target, args in (("lora", lora, [box.checkpoint]), ("controlnet", controlnet, [])):
        subprocess.run([sys.executable, str(REPO / "tests" / "tiny_addons.py"), kind, *map(str, args), str(target)],
                       check=True, capture_output=True)
    picture = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(picture).ellipse([10, 10, 54, 54], outline="white", width=4)
    picture.save(edges)
    for path in (lora, controlnet, edges):
        path.chmod(0o644)
    first = box.state["container"]
    result = box.generate("--lora", f"{lora}:0.7", "--control", f"{controlnet}:{edges}:0.8",
                          "--control-preprocess", "canny", "--json", "-o", str(box.base / "out" / "addons.png"))
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout.decode())
    assert record["loras"][0]["strength"] == 0.7 and record["controls"][0]["preprocess"] == "canny"
    assert "warnings" not in record, record["warnings"]
    for container in box.containers():
        if container.id != first:
            assert set(json.loads(container.labels["imagegen.mounts"])) >= {str(lora), str(controlnet)}
            container.remove(force=True)


def test_stop_removes_the_worker(box):
    result = box.cli("stop", "--runtime", "docker")
    assert result.returncode == 0, result.stderr.decode()
    assert box.containers() == []
    listed = box.cli("workers", "--runtime", "docker", "--json")
    assert listed.returncode == 0 and listed.stdout.decode().strip() == ""


def test_the_next_run_reaps_an_exited_worker(box):
    labels = {"imagegen.worker": "1", "imagegen.owner_uid": str(box.uid), "imagegen.slot": "cpu",
              "imagegen.owner_pid": "999999", "imagegen.image": IMAGE, "imagegen.started": "0"}
    dead = box.client.containers.run(IMAGE, entrypoint=["/bin/true"], command=[], labels=labels, detach=True,
                                     user=f"{box.uid}:{box.gid}", name=f"imagegen-reap-test-{os.getpid()}")
    assert dead.wait(timeout=60)["StatusCode"] == 0
    dead.reload()
    assert dead.status == "exited"
    result = box.cli("workers", "--runtime", "docker", "--json")
    assert result.returncode == 0, result.stderr.decode()
    assert box.containers() == [], "the exited worker container was not reaped"


def test_reap_never_removes_a_container_another_process_is_starting(box):
    from filelock import FileLock

    labels = {"imagegen.worker": "1", "imagegen.owner_uid": str(box.uid), "imagegen.slot": "cpu",
              "imagegen.owner_pid": str(os.getpid()), "imagegen.image": IMAGE,
              "imagegen.started": str(int(time.time()))}
    # created, not yet started, by a live owner (this test process) within its start timeout
    created = box.client.containers.create(IMAGE, entrypoint=["/bin/true"], command=[], labels=labels,
                                           user=f"{box.uid}:{box.gid}", name=f"imagegen-starting-test-{os.getpid()}")
    lock_path = box.home / "state" / "workers" / "docker-cpu.lock"
    exited = None
    try:
        result = box.cli("workers", "--runtime", "docker", "--json")
        assert result.returncode == 0, result.stderr.decode()
        assert created.id in {c.id for c in box.containers()}, "reap removed a container its owner is starting"
        # an exited one on a slot whose lock another process holds (it is starting a worker there) stays too
        exited = box.client.containers.run(IMAGE, entrypoint=["/bin/true"], command=[], detach=True,
                                           labels={**labels, "imagegen.owner_pid": "999999", "imagegen.started": "0"},
                                           user=f"{box.uid}:{box.gid}", name=f"imagegen-exited-test-{os.getpid()}")
        assert exited.wait(timeout=60)["StatusCode"] == 0
        with FileLock(str(lock_path)):
            os.chown(lock_path, box.uid, box.gid)
            held = box.cli("workers", "--runtime", "docker", "--json")
            assert held.returncode == 0, held.stderr.decode()
            assert exited.id in {c.id for c in box.containers()}, "reap ran outside the slot lock"
        released = box.cli("workers", "--runtime", "docker", "--json")
        assert released.returncode == 0, released.stderr.decode()
        assert exited.id not in {c.id for c in box.containers()}, "with the lock free, the exited worker is reaped"
        assert created.id in {c.id for c in box.containers()}
    finally:
        for container in (created, exited):
            try:
                container and container.remove(force=True)
            except Exception:  # noqa: BLE001 - gone already
                pass


# --- Ctrl-C never leaves a container behind --------------------------------------------------
def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the CLI exited ({process.returncode}) before {what}: {err.decode()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _interrupt(process: subprocess.Popen) -> tuple[int, str, float]:
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the CLI did not exit within 60 s of Ctrl-C: {err.decode()[-2000:]}")
    return process.returncode, err.decode(), time.monotonic() - sent


def test_ctrl_c_during_worker_start_up_leaves_no_container(box):
    assert box.containers() == []
    process = box.popen("generate", "a friendly robot", "--runtime", "docker", "--checkpoint", str(box.checkpoint),
                        "--size", "64x64", "--steps", "2", "--json", "-o", str(box.base / "out" / "never.png"))

    def starting():
        found = box.containers()
        return found and found[0].status == "running" and found[0]

    container = _wait_for(starting, 60, "the worker container to start", process)
    time.sleep(1.0)
    container.reload()
    assert (container.attrs["State"].get("Health") or {}).get("Status") != "healthy", "start-up was over already"
    code, err, took = _interrupt(process)
    assert code == 130, err
    assert json.loads(err.strip().splitlines()[-1])["code"] == "interrupted"
    assert box.containers() == [], "Ctrl-C during start-up left a container behind"
    assert not (box.base / "out" / "never.png").exists()


def test_ctrl_c_during_a_long_job_stops_the_worker_the_command_started(box):
    import requests

    assert box.containers() == []
    process = box.popen("generate", "a long job", "--runtime", "docker", "--checkpoint", str(box.checkpoint),
                        "--size", "64x64", "--steps", "400", "--json", "-o", str(box.base / "out" / "long.png"))
    container = _wait_for(lambda: box.containers() and box.containers()[0], 60, "the worker container", process)
    port = _wait_for(lambda: (container.reload() or container.ports.get("8188/tcp") or [{}])[0].get("HostPort"), 30,
                     "its published port", process)

    def running():
        try:
            queue = requests.get(f"http://127.0.0.1:{port}/queue", headers={"Authorization": f"Bearer {box.token()}"},
                                 timeout=5).json()
        except (OSError, ValueError, requests.RequestException):
            return False
        return bool(queue.get("queue_running"))

    _wait_for(running, 120, "the job to run on the worker", process)
    time.sleep(2.0)  # into sampling
    assert running(), "the job finished before Ctrl-C"
    code, err, took = _interrupt(process)
    assert code == 130, err
    assert json.loads(err.strip().splitlines()[-1])["code"] == "interrupted"
    assert box.containers() == [], "Ctrl-C during a job left the worker this command started"
    assert took < 30, f"Ctrl-C took {took:.0f}s"
    assert not (box.base / "out" / "long.png").exists()


# --- clear errors ------------------------------------------------------------------------
def test_an_unreachable_daemon_is_a_clear_error(box):
    result = box.generate("--json", "-o", str(box.base / "out" / "x.png"),
                          env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert result.returncode != 0, result.stderr.decode()
    error = error_of(result)
    assert error["code"] in ("docker_unavailable", "runtime_unavailable"), error
    assert "Docker daemon is not reachable" in error["message"] and error["hint"]
    human = box.cli("workers", "--runtime", "docker", env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert human.returncode != 0
    assert "not reachable" in human.stderr.decode() and "Traceback" not in human.stderr.decode()


def test_permission_denied_on_the_socket_is_a_clear_error(box):
    if os.getuid() == 0:
        require(box.socket_gid is not None, "the Docker socket is not a unix socket")
        result = box.generate("--json", "-o", str(box.base / "out" / "x.png"), docker_group=False)
    else:  # not root: a socket nobody may open stands in for the real one
        path = box.base / "locked.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        path.chmod(0)
        try:
            result = box.generate("--json", "-o", str(box.base / "out" / "x.png"),
                                  env={"DOCKER_HOST": f"unix://{path}"})
        finally:
            listener.close()
    assert result.returncode != 0, result.stderr.decode()
    error = error_of(result)
    assert error["code"] == "docker_permission" or "permission denied" in error["message"].lower(), error
    assert "docker group" in error["hint"]


def test_a_missing_image_says_how_to_build_it(box):
    result = box.generate("--json", "-o", str(box.base / "out" / "x.png"),
                          env={"IMAGEGEN_IMAGE": "imagegen:does-not-exist"})
    assert result.returncode == 1, result.stderr.decode()
    error = error_of(result)
    assert error["code"] == "image_missing", error
    assert "imagegen:does-not-exist" in error["message"] and "./build-image.sh" in error["hint"]
    assert box.containers() == []


def test_a_worker_that_dies_during_start_up_shows_its_log(box):
    dockerfile = f"FROM {IMAGE}\nUSER root\nRUN rm /opt/comfyui/main.py\nUSER 1000:1000\n"
    built = subprocess.run(["docker", "build", "-q", "-t", BROKEN_IMAGE, "-"], input=dockerfile.encode(),
                           capture_output=True,
                           env={**os.environ, "DOCKER_BUILDKIT": "0"}, timeout=300)
    assert built.returncode == 0, built.stderr.decode()
    result = box.generate("--json", "-o", str(box.base / "out" / "x.png"), env={"IMAGEGEN_IMAGE": BROKEN_IMAGE})
    assert result.returncode == 1, result.stderr.decode()
    error = error_of(result)
    assert error["code"] == "worker_start_failed", error
    assert "Last log lines" in error["message"] and "no ComfyUI at" in error["message"], error["message"]
    assert box.containers() == [], "the dead worker's container was left behind"


def test_a_worker_killed_for_memory_is_reported_as_out_of_memory(box):
    """A real OOM kill: a memory limit (IMAGEGEN_DOCKER_MEMORY) that ComfyUI starts in but cannot load the model in."""
    result = box.generate("--json", "-o", str(box.base / "out" / "oom.png"), env={"IMAGEGEN_DOCKER_MEMORY": OOM_LIMIT},
                          timeout=240)
    assert result.returncode == 1, result.stderr.decode()
    error = error_of(result)
    assert error["code"] == "out_of_memory", error
    assert "killed for memory" in error["message"] and OOM_LIMIT in error["message"], error["message"]
    assert "IMAGEGEN_DOCKER_MEMORY" in error["hint"]
    assert box.containers() == [], "the dead worker's container was left behind"
    assert not (box.base / "out" / "oom.png").exists()
