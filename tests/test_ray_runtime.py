"""`--runtime ray` through the real CLI on a real multi-node Ray cluster (loopback, logical GPUs),
with a real CPU ComfyUI worker per node rendering a tiny SD1.5 model fetched from the loopback hub."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, communicate, docker_with_image, run_cli
from hub_server import HubServer
from ray_cluster import RayCluster

from imagegen import __version__
from imagegen.comfy import png

cluster_test = pytest.mark.ray  # each test starts (or shares) a real Ray cluster with CPU ComfyUI workers

MODEL = "tiny-ray"
FILE = "tiny-ray-sd15.safetensors"
IMAGE = os.environ.get("IMAGEGEN_IMAGE", f"imagegen:{__version__}")   # the worker image (runtimes/docker.py)
SMALL_GPU_MIB = 1200      # holds the tiny model at 64x64 (~1.08 GB with overhead), not at 256x256 (~1.33 GB)


@pytest.fixture(scope="module")
def hub(tiny_sd15):
    with HubServer() as server:
        server.add("org/tiny-ray", FILE, tiny_sd15.read_bytes())
        yield server


@pytest.fixture(scope="module")
def cluster(ray_installed, comfyui_dir, tiny_sd15, hub, tmp_path_factory):
    """Head (no GPU) + node "small" (1 logical GPU of 1200 MiB, lacks the model) + node "big"
    (1 logical GPU of 16 GiB, holds the model already): one CPU ComfyUI worker each."""
    root = tmp_path_factory.mktemp("ray")
    base = {"IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "HF_ENDPOINT": hub.url, "OMP_NUM_THREADS": "1",
            "HF_TOKEN_PATH": str(root / "no-hf-token"), "IMAGEGEN_KEEP_WARM": "600",
            "IMAGEGEN_RAY_NODE_WORKERS": "local"}  # a local process (this machine's Docker has the image: see boxed)
    ray = RayCluster(root, base_env=base)
    try:
        ray.start_head()
        ray.add_node("small", gpus=1, labels={"imagegen.gpu_memory_mib": SMALL_GPU_MIB, "box": "small"})
        big = ray.root / "big" / "models" / "checkpoints"
        big.mkdir(parents=True)
        os.link(tiny_sd15, big / FILE) if _same_device(tiny_sd15, big) else big.joinpath(FILE).write_bytes(
            tiny_sd15.read_bytes())
        ray.add_node("big", gpus=1, labels={"imagegen.gpu_memory_mib": 16384, "box": "big"})
        yield ray
    finally:
        ray.stop()


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


@pytest.fixture(scope="module")
def env(cluster, tiny_sd15, tmp_path_factory):
    """The driver: its own IMAGEGEN_HOME with the model registered (on the hub), the cluster's token."""
    home = tmp_path_factory.mktemp("driver-home")
    data_sha = hashlib.sha256(tiny_sd15.read_bytes()).hexdigest()
    (home / "models.yaml").write_text(
        f"schema: 1\nmodels:\n  {MODEL}:\n    family: sd15\n    files:\n      checkpoint:\n"
        f"        repo: org/tiny-ray\n        file: {FILE}\n        revision: main\n        folder: checkpoints\n"
        f"        size: {tiny_sd15.stat().st_size}\n        sha256: {data_sha}\n")
    return {"IMAGEGEN_HOME": str(home), "IMAGEGEN_RUNTIME": "ray", **cluster.driver_env()}


def batch_args(out: Path, *extra: str) -> list[str]:
    return ["batch", "-o", str(out), "-m", MODEL, "--size", "64x64", "--pack", "1", "--runtime", "ray", *extra]


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def done_keys(out: Path) -> list[str]:
    return [line["key"] for line in manifest(out) if line.get("status") == "done"]


def start_batch(env: dict, out: Path, stdin: str, *extra: str, new_session: bool = False) -> subprocess.Popen:
    """The batch CLI on the cluster with its items written to stdin (closed: communicate() must not flush it)."""
    args = [sys.executable, str(REPO / "generate_image.py"), *batch_args(out, *extra)]
    driver = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, **env}, start_new_session=new_session)
    driver.stdin.write(stdin.encode())
    driver.stdin.close()
    driver.stdin = None
    return driver


def wait_while_running(driver: subprocess.Popen, until, before: str, timeout: float = 300) -> None:
    """Wait until `until()` holds (or the timeout passes), the batch still running then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None and not until():
        time.sleep(0.2)
    assert driver.poll() is None, f"the batch ended before {before}"


def an_image_done(out: Path):
    return lambda: (out / "manifest.jsonl").is_file() and bool(done_keys(out))


def hub_gets(hub: HubServer) -> int:
    """Transfers of the model's bytes (the hub serves only this file)."""
    return len(hub.gets())


@cluster_test
@pytest.mark.comfyui
def test_a_batch_spreads_over_two_nodes_and_the_node_lacking_the_model_fetches_it_once(env, hub, cluster, tmp_path):
    out = tmp_path / "out"
    prompts = "\n".join(f"a robot number {n}" for n in range(6)) + "\n"
    result = run_cli(*batch_args(out, "--steps", "2", "--json"), input=prompts.encode(), env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(records) == 6 and all(Path(r["path"]).is_file() for r in records)
    assert len({r["worker"] for r in records}) == 2             # both nodes rendered
    assert sorted(done_keys(out)) == sorted(set(done_keys(out))) and len(done_keys(out)) == 6
    assert hub_gets(hub) == 1                                   # the small node fetched it; the big one had it
    assert (cluster.root / "small" / "models" / "checkpoints" / FILE).is_file()
    assert cluster.token.encode() not in result.stderr + result.stdout
    again = run_cli(*batch_args(tmp_path / "again", "--steps", "1"), input=b"one more\n", env=env)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    assert hub_gets(hub) == 1                                   # once per node, never again


@cluster_test
@pytest.mark.comfyui
def test_generate_and_workers_show_the_cluster(env, cluster, tmp_path):
    target = tmp_path / "one.png"
    result = run_cli("generate", "a lighthouse", "-m", MODEL, "--size", "64x64", "--steps", "1", "-o", str(target),
                     "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    record = json.loads(result.stdout.decode().splitlines()[-1])
    assert record["path"] == str(target) and target.is_file() and record["worker"].startswith("ray-")
    listed = run_cli("workers", "--runtime", "ray", "--json", env=env)
    assert listed.returncode == 0, listed.stderr.decode()[-3000:]
    shown = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    nodes = [item for item in shown if item["schema"] == "imagegen.cluster_node/1"]
    gpu_nodes = sorted((node for node in nodes if node["gpus"]), key=lambda node: node["gpu_memory_mib"])
    assert [node["gpu_memory_mib"] for node in gpu_nodes] == [SMALL_GPU_MIB, 16384]
    assert all(node["address"] == "127.0.0.1" and node["auth"] and MODEL in node["models"] for node in gpu_nodes)
    assert cluster.token not in listed.stdout.decode() + listed.stderr.decode()


@cluster_test
@pytest.mark.comfyui
def test_routing_by_memory_keeps_a_large_job_off_the_small_gpu(env, tmp_path):
    out = tmp_path / "out"
    items = "\n".join(json.dumps({"prompt": f"a wide sea {n}", "size": "256x256"}) for n in range(2))
    items += "\n" + "\n".join(json.dumps({"prompt": f"a small cat {n}"}) for n in range(3)) + "\n"
    result = run_cli(*batch_args(out, "--steps", "1", "--json"), input=items.encode(), env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    large = [r for r in records if r["width"] == 256]
    assert len(large) == 2 and len(records) == 5
    workers = _workers_by_box(env)
    assert all(r["worker"] == workers["big"] for r in large), (large, workers)


def _workers_by_box(env) -> dict[str, str]:
    """Which ray slot lives on which node (by the node's `box` label)."""
    code = ("import json, ray; ray.init(logging_level='ERROR'); "
            "print(json.dumps({n['Labels'].get('box'): n['NodeID'][:8] for n in ray.nodes() if n['Alive']}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env},
                            timeout=120)
    boxes = json.loads(result.stdout.strip().splitlines()[-1])
    return {box: f"ray-{node_id}-0" for box, node_id in boxes.items() if box}


@cluster_test
@pytest.mark.comfyui
def test_a_funnel_runs_its_stages_across_nodes_and_img2img_uploads_reach_them(env, tmp_path):
    stage_file = tmp_path / "stages.yaml"
    stage_file.write_text(f"stages:\n"
                          f"  - {{name: drafts, model: {MODEL}, count: 4, keep: 2, size: 64x64, steps: 1}}\n"
                          f"  - {{name: refine, model: {MODEL}, keep: 1, size: 64x64, steps: 2, denoise: 0.5}}\n")
    out = tmp_path / "fox"
    first = run_cli("funnel", "a red fox", "-o", str(out), "--stages", str(stage_file), "--runtime", "ray", "--json",
                    env=env)
    assert first.returncode == 0, first.stderr.decode()[-3000:]
    *drafts, status = [json.loads(line) for line in first.stdout.decode().splitlines()]
    assert len(drafts) == 4 and status["status"] == "awaiting_pick"
    assert {r["worker"] for r in drafts} <= set(_workers_by_box(env).values())  # the cluster's workers
    second = run_cli("funnel", "resume", str(out), "--pick", "1,3", "--runtime", "ray", "--json", env=env)
    assert second.returncode == 0, second.stderr.decode()[-3000:]
    *refined, status = [json.loads(line) for line in second.stdout.decode().splitlines()]
    assert len(refined) == 2 and all(r["denoise"] == 0.5 and Path(r["path"]).is_file() for r in refined)


@cluster_test
@pytest.mark.comfyui
def test_run_a_users_workflow_on_the_cluster(env, cluster, tmp_path):
    """`imagegen run` with the editor's UI export: checked against a node's own definitions, run on a node."""
    editor = REPO / "tests" / "workflows" / "editor-txt2img.json"
    result = run_cli("run", str(editor), "--set", "checkpoint=" + MODEL, "--set", "Positive.text=a lighthouse",
                     "--set", "3.steps=1", "-n", "2", "-o", str(tmp_path) + "/", "--runtime", "ray", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [r["seed"] for r in records] == [1234, 1235] and all(r["prompt"] == "a lighthouse" for r in records)
    assert all(r["worker"] in _workers_by_box(env).values() for r in records)
    for record in records:
        path = Path(record["path"])
        assert path.parent == tmp_path and path.read_bytes().startswith(b"\x89PNG")
        saved = json.loads(png.read_text_chunks(path.read_bytes())["imagegen"])
        assert saved["workflow"]["name"] == editor.name and saved["workflow"]["format"] == "ui"
        assert saved["seed"] == record["seed"]
    assert cluster.token.encode() not in result.stderr + result.stdout


@cluster_test
@pytest.mark.comfyui
def test_a_rerun_after_the_driver_is_killed_finishes_every_image_once(env, tmp_path):
    out = tmp_path / "out"
    prompts = "\n".join(f"a harbour {n}" for n in range(6)) + "\n"
    driver = start_batch(env, out, prompts, "--steps", "8", new_session=True)
    wait_while_running(driver, an_image_done(out), "it could be killed")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(30)
    first = len(done_keys(out))
    assert 1 <= first < 6
    again = run_cli(*batch_args(out, "--steps", "8"), input=prompts.encode(), env=env)
    assert again.returncode == 0, again.stderr.decode()[-3000:]
    keys = done_keys(out)
    assert len(keys) == 6 and len(set(keys)) == 6
    assert len(list(out.glob("*.png"))) == 6


@cluster_test
@pytest.mark.comfyui
def test_a_cluster_without_token_auth_is_refused_unless_allowed(ray_installed, tmp_path):
    insecure = RayCluster(tmp_path / "ray", token=None)
    try:
        insecure.start_head()
        env = {**insecure.driver_env(), "IMAGEGEN_RUNTIME": "ray"}
        result = run_cli("generate", "a cat", "--json", env=env)
        assert result.returncode == 2, result.stderr.decode()[-3000:]
        error = json.loads(result.stderr.decode().strip().splitlines()[-1])
        assert error["code"] == "cluster_insecure" and "RAY_AUTH_MODE=token" in error["hint"]
        allowed = run_cli("generate", "a cat", "--json", "--ray-allow-insecure", env=env)
        error = json.loads(allowed.stderr.decode().strip().splitlines()[-1])
        assert error["code"] == "runtime_unavailable" and "no GPUs" in error["message"]  # past the check
    finally:
        insecure.stop()


def _ray_py(env, code: str) -> str:
    """Run Python against the cluster in a process of its own (a second driver); its last stdout line."""
    result = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(logging_level='ERROR'); " + code],
                            capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


FOREIGN = ("@ray.remote(num_cpus=0)\nclass Other:\n    def ping(self):\n        return 'pong'\n")


@cluster_test
@pytest.mark.comfyui
def test_ctrl_c_ends_this_commands_actors_and_leaves_other_actors_alone(env, tmp_path):
    ping = "print(ray.get(ray.get_actor('someone-else', 'imagegen').ping.remote()))"
    _ray_py(env, "exec(" + repr(FOREIGN) + "); Other.options(name='someone-else', namespace='imagegen', "
                 "lifetime='detached').remote(); " + ping)
    out = tmp_path / "out"
    prompts = "\n".join(f"a field {n}" for n in range(6)) + "\n"
    driver = start_batch(env, out, prompts, "--steps", "8")
    wait_while_running(driver, an_image_done(out), "Ctrl-C")
    driver.send_signal(signal.SIGINT)
    _, stderr = communicate(driver, 300)
    assert driver.returncode == 130, stderr.decode()[-2000:]
    names = "print(json.dumps(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True))))"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray ends a driver's actors shortly after it exits
        left = json.loads(_ray_py(env, names))
        if left == ["someone-else"]:
            break
        time.sleep(2)
    assert left == ["someone-else"]
    assert _ray_py(env, ping) == "pong"
    _ray_py(env, "ray.kill(ray.get_actor('someone-else', 'imagegen')); print('ok')")


def _docker_client():
    """This machine's Docker engine with the worker image (for the node in container mode)."""
    return docker_with_image(IMAGE)


@cluster_test
@pytest.mark.comfyui
@pytest.mark.docker
def test_a_node_whose_docker_has_the_image_runs_the_worker_container(env, cluster, tiny_sd15, tmp_path):
    """A node "boxed" joins with IMAGEGEN_RAY_NODE_WORKERS=auto (the others say local); it is removed again."""
    client = _docker_client()
    models = cluster.root / "boxed" / "models" / "checkpoints"
    models.mkdir(parents=True)
    os.link(tiny_sd15, models / FILE) if _same_device(tiny_sd15, models) else shutil.copyfile(tiny_sd15, models / FILE)
    node = cluster.add_node("boxed", gpus=1, env={"IMAGEGEN_RAY_NODE_WORKERS": "auto"},
                            labels={"imagegen.gpu_memory_mib": 16384, "box": "boxed"})
    boxed = _workers_by_box(env)["boxed"]
    node_id = boxed.split("-")[1]
    try:
        out = tmp_path / "out"
        result = run_cli(*batch_args(out, "--steps", "1", "--json", "--gpus", "box=boxed"), input=b"a paper boat\n",
                         env=env)
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        [record] = [json.loads(line) for line in result.stdout.decode().splitlines()]
        assert record["worker"] == boxed and Path(record["path"]).read_bytes().startswith(b"\x89PNG")
        listed = run_cli("workers", "--runtime", "ray", "--json", env=env)
        assert listed.returncode == 0, listed.stderr.decode()[-3000:]
        shown = [json.loads(line) for line in listed.stdout.decode().splitlines()]
        modes = {item["node_id"][:8]: item["worker_mode"] for item in shown
                 if item["schema"] == "imagegen.cluster_node/1" and item["gpus"]}
        assert modes.pop(node_id) == {"mode": "docker", "image": IMAGE}
        assert modes and all(mode == {"mode": "local"} for mode in modes.values())
        [worker] = [item for item in shown if item["schema"] == "imagegen.worker/1"
                    and item["node_id"].startswith(node_id)]
        assert worker["worker_mode"] == "docker" and worker["container"] and worker["healthy"]
        ours = client.containers.list(filters={"label": [f"imagegen.ray_node={worker['node_id']}"]})
        assert [c.id[:12] for c in ours] == [worker["container"]]
        assert ours[0].image.tags and IMAGE in ours[0].image.tags
        text = run_cli("workers", "--runtime", "ray", env=env)
        assert "workers_as=docker" in text.stdout.decode() and "workers_as=local" in text.stdout.decode()
    finally:
        for container in client.containers.list(all=True, filters={"label": ["imagegen.ray_node"]}):
            if container.labels["imagegen.ray_node"].startswith(node_id):
                container.remove(force=True)
        node.leave()


@cluster_test
@pytest.mark.comfyui
def test_a_node_lost_mid_batch_is_replaced_where_a_gpu_is_free_and_every_image_is_in_the_manifest_once(
        env, cluster, tmp_path):
    """Runs last but one: it takes the big node away for good. A spare node (16 GiB, without the model) joins
    first and is left out by --gpus; the big node's lost worker is replaced there, and only a 16 GiB GPU can
    run the wide images it held, so the retried jobs run on the replacement."""
    cluster.add_node("spare", gpus=1, labels={"imagegen.gpu_memory_mib": 16384, "box": "spare"})
    workers = _workers_by_box(env)
    out = tmp_path / "out"
    items = [{"prompt": f"a wide valley {n}", "size": "256x256"} for n in range(5)]
    items += [{"prompt": f"a mountain {n}"} for n in range(3)]
    big = next(node for node in cluster.nodes if node.name == "big")
    driver = start_batch(env, out, "".join(json.dumps(item) + "\n" for item in items),
                         "--steps", "6", "--json", "--gpus", "box=small,box=big", new_session=True)
    wait_while_running(driver, lambda: (out / "manifest.jsonl").is_file() and any(
        line.get("worker") == workers["big"] for line in manifest(out)), "the node could be lost")
    big.kill()
    stdout, stderr = communicate(driver, 600)
    assert driver.returncode == 0, stderr.decode()[-3000:]
    keys = done_keys(out)
    assert len(keys) == 8 and len(set(keys)) == 8, manifest(out)
    assert len(list(out.glob("*.png"))) == 8
    records = [json.loads(line) for line in stdout.decode().splitlines()]
    wide = [r for r in records if r["width"] == 256]
    assert len(wide) == 5 and {r["worker"] for r in wide} <= {workers["big"], workers["spare"]}, records
    assert any(r["worker"] == workers["spare"] for r in wide), records  # the retried jobs ran on the replacement
    assert "replaced on node" in stderr.decode()
    assert (cluster.root / "spare" / "models" / "checkpoints" / FILE).is_file()  # fetched there before it started


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from imagegen.runtimes.ray import import_ray
    from imagegen.util.errors import ImagegenError

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when it is not installed
    with pytest.raises(ImagegenError) as caught:
        import_ray()
    assert caught.value.code == "runtime_unavailable" and "pip install 'imagegen[ray]'" in caught.value.hint


def test_a_nodes_setting_says_what_its_actors_start(monkeypatch, tmp_path):
    from imagegen.runtimes import ray_node

    monkeypatch.setenv(ray_node.WORKERS_ENV, "local")
    assert ray_node.mode("n1") == {"mode": "local"}
    monkeypatch.setenv(ray_node.WORKERS_ENV, "http://127.0.0.1:1#a,http://127.0.0.1:2#b")
    assert ray_node.mode("n1") == {"mode": "attached", "workers": 2}
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-engine.sock'}")  # a node without a Docker engine
    monkeypatch.setenv(ray_node.WORKERS_ENV, "docker")
    assert set(ray_node.mode("n1")) == {"mode", "error"} and ray_node.mode("n1")["mode"] == "docker"
    monkeypatch.delenv(ray_node.WORKERS_ENV)
    fallback = ray_node.mode("n1")
    assert fallback["mode"] == "local" and fallback["why"]  # auto: a local process, and why


def test_with_no_gpu_free_a_lost_worker_is_not_replaced_and_says_so(monkeypatch):
    """The decision alone (a cluster whose every GPU is held is costly to build for it): no actor is made."""
    from types import SimpleNamespace

    from imagegen.runtimes import ray_place
    from imagegen.util.errors import ImagegenError

    asked = []
    held = SimpleNamespace(available_resources=lambda: asked.append(1) or {"CPU": 4.0, "GPU": 0.0},
                           remote=lambda *a, **k: pytest.fail("no actor may be made without a free GPU"))
    monkeypatch.setattr(ray_place, "FREE_WAIT", 1.5)
    runtime = SimpleNamespace(ray=held, start_timeout=60.0, nodes=lambda: [], replacements=0)
    with pytest.raises(ImagegenError) as caught:
        ray_place.anywhere(runtime, "ray-1a2b3c4d-0")
    assert caught.value.code == "worker_start_failed" and "no GPU of the Ray cluster is free" in caught.value.message
    assert len(asked) >= 2  # it waited for a GPU to come free before giving up


def test_a_nodes_definitions_leave_its_files_out_but_keep_its_other_choices():
    """Which files a run may name is not one node's to say: each fetches what it lacks (or a shared tree has it)."""
    from imagegen.runtimes.ray_client import without_files

    info = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["only-here.safetensors"], {}]}}},
            "LoraLoader": {"input": {"required": {"lora_name": ["COMBO", {"options": ["mine.safetensors"]}]}}},
            "KSampler": {"input": {"required": {"sampler_name": [["euler", "dpmpp_2m"], {}], "seed": ["INT", {}]}}},
            "SomeCustomNode": {"input": {"required": {"mode": [["a", "b"], {}]}}}}
    kept = without_files(info)
    assert kept["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] == [[], {}]
    assert kept["LoraLoader"]["input"]["required"]["lora_name"] == ["COMBO", {"options": []}]
    assert kept["KSampler"]["input"]["required"]["sampler_name"][0] == ["euler", "dpmpp_2m"]
    assert kept["SomeCustomNode"]["input"]["required"]["mode"][0] == ["a", "b"]


def test_a_worker_error_travels_back_as_the_same_imagegen_error():
    from imagegen.runtimes.ray_actor import as_failure, raise_failure
    from imagegen.util.errors import ImagegenError

    sent = ImagegenError("timeout", "the job stalled", hint="raise it", phase="sampling", prompt_id="p1")
    with pytest.raises(ImagegenError) as caught:
        raise_failure(as_failure(sent))
    got = caught.value
    assert (got.code, got.message, got.hint, got.details) == ("timeout", "the job stalled", "raise it",
                                                              {"phase": "sampling", "prompt_id": "p1"})
    assert raise_failure({"ok": 3}) == {"ok": 3}


@cluster_test
@pytest.mark.comfyui
def test_the_head_node_lost_ends_the_batch_cleanly_with_every_image_written_or_reported(env, cluster, tmp_path):
    """Runs after the lost node: it takes the whole cluster away."""
    out = tmp_path / "out"
    prompts = "\n".join(f"a desert {n}" for n in range(30)) + "\n"
    driver = start_batch(env, out, prompts, "--steps", "12", "--json")
    wait_while_running(driver, an_image_done(out), "the head could be lost")
    assert cluster.head is not None
    cluster.head.kill()
    lost = time.monotonic()
    _, stderr = communicate(driver, 300)
    assert driver.returncode == 1, stderr.decode()[-3000:]
    assert time.monotonic() - lost < 60  # before Ray's own abort of a driver whose head is gone
    lines = manifest(out)
    keys = [line["key"] for line in lines]
    assert len(keys) == 30 and len(set(keys)) == 30               # each image: done, or failed and reported
    failed = [line for line in lines if line["status"] == "failed"]
    assert failed and all(line["error"]["code"] == "worker_died" for line in failed)
    assert "head node" in stderr.decode()
