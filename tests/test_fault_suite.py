"""The fault suite: the real CLI against real local ComfyUI workers on CPU (and a real Docker engine)
under faults a user meets: a CPU hog beside it, two CLIs on one worker with a Ctrl-C, a reboot that
left a stale worker record whose PID now belongs to someone else, a disk that fills mid-batch, and
SIGKILL at random points of a batch. Every scenario must end with nothing lost (each finished image
in the manifest exactly once, each a complete PNG), no hang (every wait has a deadline that fails
the test), nothing foreign touched, and no orphaned process or container left."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IN_CI, docker_with_image, require
from fault_tools import (
    Cli,
    alive,
    assert_manifest_sound,
    assert_no_orphans,
    assert_no_processes,
    assert_nothing_lost,
    comfy_queue,
    complete_png,
    cpu_hogs,
    finish,
    free_port,
    kill_group,
    kill_our_processes,
    last_error,
    manifest_count,
    records,
    wait_for,
)

pytestmark = pytest.mark.comfyui

KEEP_WARM = "180"        # short, so a worker this suite forgets still goes away on its own
CLI_TIMEOUT = 420        # generous: 2 cores, other test runs beside us; past it the test fails as a hang


def prompts(tag: str, count: int) -> bytes:
    return "\n".join(f"{tag} prompt {i}" for i in range(count)).encode() + b"\n"


def batch_args(tiny: Path, out: Path, *extra: str, workers: int = 2, steps: int = 2) -> list[str]:
    return ["batch", "-o", str(out), "--checkpoint", str(tiny), "--size", "64x64", "--steps", str(steps),
            "--workers", str(workers), "--keep-warm", KEEP_WARM, "--json", *extra]


def generate_args(tiny: Path, target: Path, prompt: str, steps: int = 2) -> list[str]:
    return ["generate", prompt, "--checkpoint", str(tiny), "--size", "64x64", "--steps", str(steps),
            "--keep-warm", KEEP_WARM, "--json", "-o", str(target)]


def ok(result, what: str) -> None:
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stderr.decode()[-3000:]}"


def home_env(comfyui_dir: Path, home: Path) -> dict:
    return {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local"}


@contextlib.contextmanager
def fresh_home(comfyui_dir: Path, home: Path):
    """A home of its own for a scenario that must not share the warm workers; stopped afterwards."""
    cli = Cli(home_env(comfyui_dir, home))
    try:
        yield cli
    finally:
        with contextlib.suppress(Exception):
            cli.run("stop", "--all", timeout=120)
        kill_our_processes(home)


@pytest.fixture(scope="module")
def suite(comfyui_dir, tmp_path_factory):
    """One IMAGEGEN_HOME whose warm workers the scenarios share; everything stopped at the end."""
    home = tmp_path_factory.mktemp("fault-home")
    cli = Cli(home_env(comfyui_dir, home))
    yield cli, home
    with contextlib.suppress(Exception):
        cli.run("stop", "--all", timeout=120)
    kill_our_processes(home)


# --- 1. a CPU hog beside a batch -------------------------------------------------------------
def test_batch_finishes_beside_a_cpu_hog(suite, tiny_sd15, tmp_path):
    cli, home = suite
    out = tmp_path / "out"
    with cpu_hogs(2):
        batch = cli.start(*batch_args(tiny_sd15, out, steps=4), input=prompts("hogged", 6))
        try:
            wait_for(lambda: manifest_count(out) >= 1 or batch.poll() is not None, CLI_TIMEOUT, "the first image")
            busy = {name: r["pid"] for name, r in records(home).items()}
            probes = 0
            while batch.poll() is None and probes < 3:   # another terminal's health probes, on a loaded machine
                probe = cli.run("workers", "--json", timeout=120)
                ok(probe, "imagegen workers beside a busy batch")
                probes += 1
            result = finish(batch, CLI_TIMEOUT, "the batch beside two busy loops")
        finally:
            if batch.poll() is None:
                kill_group(batch, signal.SIGKILL)
                batch.communicate()
    ok(result, "a batch beside two busy loops")
    assert_nothing_lost(out, 6)
    assert len(result.stdout.decode().splitlines()) == 6
    still = {name: r["pid"] for name, r in records(home).items()}
    assert all(still.get(name) == pid for name, pid in busy.items()), \
        f"a busy worker was reaped or restarted under load: before {busy}, after {still}"
    assert_no_orphans(home)


# --- 2. two CLIs at once on one worker -------------------------------------------------------
def warm_worker(cli: Cli, tiny: Path, tmp_path: Path) -> dict:
    """The slot-cpu worker warm, started by a command that has ended (so neither A nor B owns it)."""
    ok(cli.run(*generate_args(tiny, tmp_path / "warm.png", "warm up"), timeout=CLI_TIMEOUT), "the warm-up generate")
    return records(Path(cli.env["IMAGEGEN_HOME"]))["local-cpu"]


def test_two_clis_share_one_warm_worker(suite, tiny_sd15, tmp_path):
    cli, home = suite
    record = warm_worker(cli, tiny_sd15, tmp_path)
    out = tmp_path / "out"
    a = cli.start(*batch_args(tiny_sd15, out, workers=1, steps=6), input=prompts("shared", 3))
    b = cli.start(*generate_args(tiny_sd15, tmp_path / "b.png", "the other terminal", steps=6))
    result_a, result_b = finish(a, CLI_TIMEOUT, "batch A"), finish(b, CLI_TIMEOUT, "generate B")
    ok(result_a, "batch A beside generate B")
    ok(result_b, "generate B beside batch A")
    assert_nothing_lost(out, 3)
    assert complete_png(tmp_path / "b.png")
    assert records(home)["local-cpu"]["pid"] == record["pid"], "both must have used the one warm worker"
    assert_no_orphans(home)


def ctrl_c_while_another_is_queued(cli: Cli, tiny: Path, tmp_path: Path,
                                   a_kind: str = "generate") -> tuple[subprocess.CompletedProcess, dict]:
    """A renders a long job; B queues behind it on the same worker; Ctrl-C (SIGINT to A's group)."""
    home = Path(cli.env["IMAGEGEN_HOME"])
    if a_kind == "batch":   # depth 1: A keeps one job on the worker, so a second one there is B's
        a = cli.start(*batch_args(tiny, tmp_path / "a-batch", "--depth", "1", workers=1, steps=40),
                      input=prompts("interrupted batch", 3))
    else:
        a = cli.start(*generate_args(tiny, tmp_path / "a.png", "interrupted in terminal A", steps=40))
    b = None
    try:
        record = wait_for(lambda: records(home).get("local-cpu"), CLI_TIMEOUT, "A's worker record")
        wait_for(lambda: comfy_queue(record).get("queue_running") or a.poll() is not None, CLI_TIMEOUT,
                 "A's job running on the worker")
        assert a.poll() is None, f"A ended before B could queue: {a.communicate()[1].decode()[-2000:]}"
        b = cli.start(*generate_args(tiny, tmp_path / "b.png", "queued in terminal B"))

        def both_on_the_worker():
            queue = comfy_queue(record)
            jobs = len(queue.get("queue_running", [])) + len(queue.get("queue_pending", []))
            return jobs >= 2 or b.poll() is not None

        wait_for(both_on_the_worker, 120, "B's job queued behind A's")
        assert b.poll() is None, f"B ended before A was interrupted: {b.communicate()[1].decode()[-2000:]}"
        assert a.poll() is None, "A finished before it could be interrupted (make its job longer)"
        kill_group(a, signal.SIGINT)
        result_a = finish(a, 120, "interrupted A")
        assert result_a.returncode == 130, result_a.stderr.decode()[-2000:]
        result_b = finish(b, CLI_TIMEOUT, "B queued behind the interrupted A")
        return result_b, record
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                kill_group(process, signal.SIGKILL)
                process.communicate()


def test_ctrl_c_in_one_cli_spares_the_other_on_a_shared_warm_worker(suite, tiny_sd15, tmp_path):
    cli, home = suite
    before = warm_worker(cli, tiny_sd15, tmp_path)
    result_b, _record = ctrl_c_while_another_is_queued(cli, tiny_sd15, tmp_path)
    ok(result_b, "B after A's Ctrl-C")
    assert complete_png(tmp_path / "b.png")
    assert not (tmp_path / "a.png").exists() or complete_png(tmp_path / "a.png")
    after = records(home).get("local-cpu")
    assert after and after["pid"] == before["pid"] and alive(before["pid"]), \
        "the warm worker neither command started must stay up"
    assert_no_orphans(home)


def test_a_too_short_timeout_in_one_cli_neither_stops_the_shared_worker_nor_fails_the_other(suite, tiny_sd15,
                                                                                          tmp_path):
    """C asks for --timeout 5 on a job far longer than that while B renders on the same warm worker:
    C fails (refused up front, or timed out) but B finishes and the worker stays."""
    cli, home = suite
    before = warm_worker(cli, tiny_sd15, tmp_path)
    b = cli.start(*generate_args(tiny_sd15, tmp_path / "b.png", "the long-running neighbour", steps=20))
    try:
        wait_for(lambda: comfy_queue(before).get("queue_running") or b.poll() is not None, CLI_TIMEOUT, "B running")
        c = cli.run(*generate_args(tiny_sd15, tmp_path / "c.png", "in a hurry", steps=400), "--timeout", "5",
                    timeout=CLI_TIMEOUT)
        result_b = finish(b, CLI_TIMEOUT, "B beside C's short timeout")
    finally:
        if b.poll() is None:
            kill_group(b, signal.SIGKILL)
            b.communicate()
    assert c.returncode != 0, "a 400-step job cannot finish within 5 s here"
    ok(result_b, "B while C's --timeout 5 ran out")
    assert complete_png(tmp_path / "b.png")
    after = records(home).get("local-cpu")
    assert after and after["pid"] == before["pid"] and alive(before["pid"]), \
        f"C's timeout stopped the shared worker: {last_error(c)}"
    assert not (tmp_path / "c.png").exists()
    assert_no_orphans(home)


@pytest.mark.parametrize("a_kind", ["generate", "batch"])
def test_ctrl_c_in_the_cli_that_started_the_worker_spares_the_one_queued_on_it(comfyui_dir, tiny_sd15, tmp_path,
                                                                               a_kind):
    """A starts the worker cold; B queues on it; Ctrl-C in A must not take B's worker away."""
    with fresh_home(comfyui_dir, tmp_path / "home") as cli:
        result_b, _record = ctrl_c_while_another_is_queued(cli, tiny_sd15, tmp_path, a_kind)
        assert result_b.returncode == 0, ("B failed after A's Ctrl-C stopped the worker B was queued on: "
                                          f"{result_b.stderr.decode()[-2000:]}")
        assert complete_png(tmp_path / "b.png")
        assert_no_orphans(tmp_path / "home")


# --- 4. a disk that fills mid-batch ------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    require(os.geteuid() == 0 or IN_CI, "mounting a tmpfs needs root")
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
    assert mounted.returncode == 0, f"cannot mount a tmpfs at {where}: {mounted.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on the disk."""
    stats = os.statvfs(disk)
    filler = disk / "filler.bin"
    filler.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))
    return filler


def test_a_disk_that_fills_mid_batch_ends_with_disk_full_and_a_rerun_completes(suite, tiny_sd15, tmp_path):
    cli, home = suite
    with small_tmpfs(tmp_path / "disk", "400k") as disk:
        filler = fill(disk, 32 * 1024)   # room for two or three 64x64 images (~12 KB each) and the manifest
        out = disk / "out"
        args = batch_args(tiny_sd15, out)
        first = cli.run(*args, input=prompts("full disk", 6), timeout=CLI_TIMEOUT)
        assert first.returncode == 1, f"exit {first.returncode}, stderr:\n{first.stderr.decode()[-3000:]}"
        error = last_error(first)
        records_before = assert_manifest_sound(out)
        done_before = {r["key"] for r in records_before if r["status"] == "done"}
        assert len(done_before) < 6, "all six fitted: the disk was too big"
        failed = [r["error"]["code"] for r in records_before if r["status"] == "failed"]
        assert set(failed) <= {"disk_full"}, f"a full disk recorded as other errors: {failed}"

        filler.unlink()
        second = cli.run(*args, input=prompts("full disk", 6), timeout=CLI_TIMEOUT)
        ok(second, "the rerun after freeing space")
        assert_nothing_lost(out, 6)
    assert_no_orphans(home)
    # what the user saw the first time: the batch stops as disk_full (not jobs_failed), naming the folder
    assert error["code"] == "disk_full", error
    assert str(disk) in error["message"], f"the message must name the folder: {error}"
    assert error.get("hint"), error


# --- 5. SIGKILL at random points of a batch, then reruns --------------------------------------
def test_sigkill_at_random_points_then_rerun_loses_nothing(suite, tiny_sd15, tmp_path):
    cli, home = suite
    out = tmp_path / "out"
    args, items = batch_args(tiny_sd15, out, steps=6), prompts("killed", 12)
    rng = random.Random(1405)
    killed = 0
    for round_ in range(3):
        # a random point: after a random number of further images (0: during start-up), plus a random
        # fraction of the next one; relative to the batch's own progress, so a fast machine kills too
        further, extra = rng.randint(0, 2), rng.uniform(0.0, 2.0)
        target = manifest_count(out) + further
        process = cli.start(*args, input=items)
        try:
            wait_for(lambda p=process, t=target: manifest_count(out) >= t or p.poll() is not None, CLI_TIMEOUT,
                     f"{further} more image(s) before the kill")
            deadline = time.monotonic() + extra
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.02)
            killed += process.poll() is None
            kill_group(process, signal.SIGKILL)
            process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                kill_group(process, signal.SIGKILL)
                process.communicate()
        print(f"round {round_}: SIGKILL after {further} more image(s) + {extra:.1f}s, "
              f"{manifest_count(out)} manifest line(s), exit {process.returncode}")
        assert_manifest_sound(out)   # every line valid, every image whole, no temp file, even right after a kill
    assert killed >= 2, f"only {killed} of 3 rounds were killed mid-batch: the batch finished first"
    for _attempt in range(3):
        result = cli.run(*args, input=items, timeout=CLI_TIMEOUT)
        if result.returncode == 0:
            break
    ok(result, "the rerun after three SIGKILLs")
    assert_nothing_lost(out, 12)
    assert_no_orphans(home)
    ok(cli.run("stop", "--all", timeout=120), "stop --all")
    assert not records(home), f"worker records left after stop --all: {list(records(home))}"
    assert_no_processes(home)


def test_sigkill_of_a_worker_mid_batch_takes_its_comfyui_along(suite, tiny_sd15, tmp_path):
    """Only the worker process dies (not its group): its ComfyUI child must not live on holding memory,
    and the batch finishes on the other worker or a fresh one."""
    cli, home = suite
    # both workers warm and started by a command that has ended, as after any earlier batch
    ok(cli.run(*batch_args(tiny_sd15, tmp_path / "warm"), input=prompts("warm", 2), timeout=CLI_TIMEOUT), "warm-up")
    # an idle worker dies with no imagegen command running: its ComfyUI must go by itself
    idle = records(home)["local-cpu-2"]["pid"]
    children = [int(c) for c in Path(f"/proc/{idle}/task/{idle}/children").read_text().split()]
    assert children, "the warm worker has no ComfyUI child"
    os.kill(idle, signal.SIGKILL)
    wait_for(lambda: not any(alive(c) for c in children), 60,
             f"ComfyUI (pid {children}) to exit after its worker (pid {idle}) was SIGKILLed")
    out = tmp_path / "out"
    process = cli.start(*batch_args(tiny_sd15, out, steps=20), input=prompts("worker killed", 6))
    try:
        wait_for(lambda: manifest_count(out) >= 1 or process.poll() is not None, CLI_TIMEOUT, "the first image")
        victim = records(home).get("local-cpu")
        assert victim and process.poll() is None, "the batch ended before a worker could be killed"
        os.kill(victim["pid"], signal.SIGKILL)
        result = finish(process, CLI_TIMEOUT, "the batch whose worker was killed")
    finally:
        if process.poll() is None:
            kill_group(process, signal.SIGKILL)
            process.communicate()
    ok(result, "the batch after one of its workers was SIGKILLed")
    assert_nothing_lost(out, 6)
    assert_no_orphans(home)


# --- 3. a reboot: a stale worker record whose PID now belongs to an unrelated process ------------
def stale_record(home: Path, pid: int, variant: str) -> Path:
    """What a worker left before a reboot: its port is dead now and its PID is someone else's."""
    directory = home / "state" / "workers"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = {"event": "ready", "port": free_port(), "pid": pid, "device": "cpu", "imagegen_version": "0.3.0",
              "token": secrets.token_urlsafe(16), "comfy_port": free_port()}
    if variant == "with identity":   # a newer record: its start time and command line are the worker's, not sleep's
        record.update({"pid_start": 12345, "cmdline": f"{sys.executable} -m imagegen.entry serve --port 0",
                       "comfy_pid": pid + 1, "comfy_start": 12346, "comfy_cmdline": "python comfy_launch.py main.py"})
    path = directory / "local-cpu.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle)
    return path


def test_a_stale_record_with_a_reused_pid_never_signals_that_process(comfyui_dir, tiny_sd15, tmp_path):
    home = tmp_path / "home"
    bystander = subprocess.Popen(["sleep", "1000"], start_new_session=True)   # the user's shell, browser, ...
    try:
        with fresh_home(comfyui_dir, home) as cli:
            for variant in ("legacy", "with identity"):
                for command in (["workers"], ["workers", "--json"], ["stop", "--all"]):
                    stale_record(home, bystander.pid, variant)
                    result = cli.run(*command, timeout=120)
                    assert alive(bystander.pid), (f"`imagegen {' '.join(command)}` ({variant} record) killed pid "
                                                  f"{bystander.pid}, not a worker: {result.stderr.decode()[-1000:]}")
                    ok(result, f"imagegen {' '.join(command)} over a stale {variant} record")
            stale_record(home, bystander.pid, "legacy")
            target = tmp_path / "after-reboot.png"
            result = cli.run(*generate_args(tiny_sd15, target, "after a reboot"), timeout=CLI_TIMEOUT)
            assert alive(bystander.pid), "generate over a stale record killed an unrelated process"
            ok(result, "generate over a stale record")
            assert complete_png(target)
            assert records(home)["local-cpu"]["pid"] != bystander.pid
            assert_no_orphans(home)
    finally:
        still_there = bystander.poll() is None
        bystander.kill()
        bystander.wait(30)
    assert still_there


# --- 6. Docker: containers whose owner is gone, and containers imagegen does not own ------------
FAULT_USER = "imagegen-fault"   # a user of its own: `stop --all` as that user touches no other test's containers


def _fault_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(FAULT_USER)
    except KeyError:
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                               "--shell", "/usr/sbin/nologin", FAULT_USER], capture_output=True, text=True, timeout=60)
        require(made.returncode == 0, f"cannot create the test user {FAULT_USER}: {made.stderr.strip()}")
        entry = pwd.getpwnam(FAULT_USER)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def docker_box(tiny_sd15):
    """The CLI as a non-root user with the Docker socket's group, a world-readable base folder."""
    from test_docker import IMAGE, _socket_path, _test_user_python

    client = docker_with_image(IMAGE)
    if os.getuid() == 0:
        require(shutil.which("setpriv") is not None, "setpriv (util-linux) is needed to run the CLI as a non-root user")
        uid, gid = _fault_user()
        python = _test_user_python()
        sock = _socket_path()
        groups = f"--groups={sock.stat().st_gid}" if sock and sock.exists() else "--clear-groups"
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={gid}", groups, "--"]
    else:
        uid, gid, python, prefix = os.getuid(), os.getgid(), sys.executable, []
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="imagegen-fault-docker-"))   # under /tmp: the user can reach it
    base.chmod(0o755)
    (base / "checkpoints").mkdir(mode=0o755)
    checkpoint = base / "checkpoints" / "tiny-sd15.safetensors"
    shutil.copyfile(tiny_sd15, checkpoint)
    checkpoint.chmod(0o644)
    for name in ("user-home", "imagegen-home", "out"):
        (base / name).mkdir()
        os.chown(base / name, uid, gid)
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "DOCKER_HOST", "TMPDIR", "CI")}
    env = {**keep, "HOME": str(base / "user-home"), "IMAGEGEN_HOME": str(base / "imagegen-home"),
           "IMAGEGEN_RUNTIME": "docker", "IMAGEGEN_KEEP_WARM": KEEP_WARM, "PYTHONDONTWRITEBYTECODE": "1"}
    cli = Cli(env, prefix=prefix, python=python, cwd=base)

    def mine():
        return client.containers.list(all=True, filters={"label": ["imagegen.worker=1", f"imagegen.owner_uid={uid}"]})

    try:
        yield cli, client, checkpoint, base, mine
    finally:
        for container in mine():
            with contextlib.suppress(Exception):
                container.remove(force=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.docker
def test_docker_sigkilled_batches_leave_no_orphaned_container_and_stop_spares_foreign_ones(docker_box):
    cli, client, checkpoint, base, mine = docker_box
    from test_docker import IMAGE

    tag = secrets.token_hex(3)
    foreign = [client.containers.run(IMAGE, ["1000"], entrypoint="sleep", detach=True, name=f"fault-foreign-{tag}",
                                     labels={"imagegen.worker": "1"}),
               client.containers.run(IMAGE, ["1000"], entrypoint="sleep", detach=True, name=f"fault-plain-{tag}")]
    try:
        out = base / "out" / "batch"
        args = ["batch", "-o", str(out), "--checkpoint", str(checkpoint), "--size", "64x64", "--steps", "2",
                "--workers", "1", "--runtime", "docker", "--json"]
        items = prompts("docker killed", 4)
        # round 1: SIGKILL while the container is starting; round 2: once an image is done
        for when in ("starting", "mid-batch"):
            process = cli.start(*args, input=items)
            try:
                if when == "starting":
                    wait_for(lambda p=process: mine() or p.poll() is not None, CLI_TIMEOUT, "the worker container")
                else:
                    wait_for(lambda p=process: manifest_count(out) >= 1 or p.poll() is not None, CLI_TIMEOUT,
                             "the first finished image")
            finally:
                kill_group(process, signal.SIGKILL)
                process.communicate(timeout=60)
            print(f"{when}: SIGKILL; containers {[(c.name, c.status) for c in mine()]}")
        result = cli.run(*args, input=items, timeout=CLI_TIMEOUT)
        ok(result, "the docker batch after two SIGKILLs")
        assert_nothing_lost(out, 4)
        after_rerun = [(c.name, c.status) for c in mine()]   # checked last: stop --all is still tried
        ok(cli.run("stop", "--all", "--runtime", "docker", timeout=180), "stop --all")
        assert not mine(), f"containers left after stop --all: {[c.name for c in mine()]}"
        for container in foreign:
            container.reload()
            assert container.status == "running", f"stop --all touched the foreign container {container.name}"
        labelled = client.containers.list(all=True, filters={"label": "imagegen.worker"})
        unexpected = [c.name for c in labelled if c.labels.get("imagegen.owner_uid") in (None, str(os.getuid()))
                      and c.id not in {f.id for f in foreign}]
        assert not unexpected, f"containers this test did not expect: {unexpected}"
        assert [status for _name, status in after_rerun] == ["running"], \
            f"after the rerun one running worker expected (the killed runs' ones cleaned up), found {after_rerun}"
    finally:
        for container in foreign:
            with contextlib.suppress(Exception):
                container.remove(force=True)

