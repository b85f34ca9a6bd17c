"""Downloads against a real HTTP server on 127.0.0.1 that speaks the hub's protocol (tests/hub_server.py),
with its faults: cut connections, corrupted bytes, wrong sizes, gated repos, a slow server, a full
disk, concurrent fetches and Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import types
from collections import namedtuple
from pathlib import Path

import pytest
from hub_server import HubServer

from imagegen.models import cache, fetch
from imagegen.models.ledger import LEDGER
from imagegen.models.registry import Bundle, ModelFile
from imagegen.util.errors import ImagegenError

REPO = Path(__file__).resolve().parent.parent
SIZE = 600 * 1024
TOKEN = "hf_secretTESTtoken0123456789"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.file_download

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("IMAGEGEN_SHARED_MODELS", raising=False)
        # subprocesses: no stored login
        monkeypatch.setenv("HF_TOKEN_PATH", str(Path(os.environ["IMAGEGEN_HOME"]) / "no-hf-token"))
        # small read chunks so a cut or an interruption lands mid-file; no 1 s pause before a retry
        monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
        monkeypatch.setattr(huggingface_hub.file_download, "time", types.SimpleNamespace(sleep=lambda _: None))
        yield server


@pytest.fixture
def models_dir(tmp_path) -> Path:
    return tmp_path / "models"


def make_bundle(hub: HubServer, name: str = "tiny", repo: str = "org/tiny", size: int = SIZE, *,
                registry_sha: bool = True, registry_size: bool = True, gated: bool = False,
                data: bytes | None = None) -> tuple[Bundle, bytes]:
    data = data if data is not None else os.urandom(size)
    sha = hub.add(repo, f"{name}.safetensors", data)
    file = ModelFile(key=f"{name}.checkpoint", folder="checkpoints", filename=f"{name}.safetensors", repo=repo,
                     path_in_repo=f"{name}.safetensors", revision="main", size=len(data) if registry_size else None,
                     sha256=sha if registry_sha else None, gated=gated)
    return Bundle(name=name, family="sd15", files={"checkpoint": file}, gated=gated), data


def fetch_events(bundle, models_dir, **kwargs):
    events: list[dict] = []
    result = fetch.fetch_bundle(bundle, models_dir, events.append, **kwargs)
    return result, events


def leftovers(models_dir: Path) -> list[Path]:
    return sorted((models_dir / fetch.DOWNLOADS).rglob("*.part")) if (models_dir / fetch.DOWNLOADS).exists() else []


def test_downloads_verifies_and_records_then_trusts_the_ledger(hub, models_dir, monkeypatch):
    bundle, data = make_bundle(hub)
    result, events = fetch_events(bundle, models_dir)
    path = models_dir / "checkpoints" / "tiny.safetensors"
    assert result == {"checkpoint": path} and path.read_bytes() == data
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[1] == "start" and kinds[-3:] == ["verifying", "verified", "done"]
    assert "recorded" not in kinds and all(json.dumps(e) for e in events)
    assert events[-2]["sha256"] == hashlib.sha256(data).hexdigest() and events[-2]["source"] == "registry"
    heads = [r for r in hub.requests if r.method == "HEAD"]
    assert [r.path for r in heads] == ["/org/tiny/resolve/main/tiny.safetensors"] and len(hub.gets()) == 1
    assert not leftovers(models_dir)
    ledger = json.loads((models_dir / LEDGER).read_text())
    assert ledger["checkpoints/tiny.safetensors"]["sha256"] == hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(fetch, "sha256_file", lambda path: pytest.fail("re-hashed a verified file"))
    hub.requests.clear()
    _, events = fetch_events(bundle, models_dir)
    assert [e["event"] for e in events] == ["done"] and events[0]["cached"] and not hub.requests


def test_unknown_sha256_is_recorded_on_first_download(hub, models_dir):
    bundle, data = make_bundle(hub, registry_sha=False, registry_size=False)
    _, events = fetch_events(bundle, models_dir)
    sha = hashlib.sha256(data).hexdigest()
    recorded = [e for e in events if e["event"] == "recorded"]
    assert len(recorded) == 1 and recorded[0]["sha256"] == sha and "not in the registry" in recorded[0]["message"]
    assert json.loads((models_dir / LEDGER).read_text())["checkpoints/tiny.safetensors"]["sha256"] == sha


def test_connection_cut_mid_file_continues_with_a_range_request(hub, models_dir):
    bundle, data = make_bundle(hub)
    hub.cut_at, hub.cut_times = SIZE // 2 + 100, 1
    fetch_events(bundle, models_dir)
    assert (models_dir / "checkpoints" / "tiny.safetensors").read_bytes() == data
    gets = hub.gets()
    assert len(gets) == 2 and gets[1].status == 206 and gets[1].range == f"bytes={SIZE // 2 // 65536 * 65536}-"


def test_connection_cut_for_good_fails_then_a_rerun_completes(hub, models_dir):
    bundle, data = make_bundle(hub)
    hub.cut_at, hub.cut_times = SIZE // 2 + 100, 100
    with pytest.raises(ImagegenError) as failed:
        fetch_events(bundle, models_dir)
    assert failed.value.code == "download_failed" and "run the same command again" in failed.value.hint.lower()
    final = models_dir / "checkpoints" / "tiny.safetensors"
    assert not final.exists()
    [part] = leftovers(models_dir)
    kept = part.stat().st_size
    assert 0 < kept < SIZE

    hub.cut_times = 0
    hub.requests.clear()
    _, events = fetch_events(bundle, models_dir)
    assert final.read_bytes() == data
    assert hashlib.sha256(final.read_bytes()).hexdigest() == bundle.files["checkpoint"].sha256
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed"] and start["bytes"] == kept
    assert [g.range for g in hub.gets()] == [f"bytes={kept}-"]


def test_corrupted_byte_deletes_the_file(hub, models_dir):
    bundle, data = make_bundle(hub)
    hub.corrupt_at = 12345
    with pytest.raises(ImagegenError) as failed:
        fetch_events(bundle, models_dir)
    error = failed.value
    assert error.code == "checksum_mismatch"
    assert bundle.files["checkpoint"].sha256 in error.message and error.details["got"] in error.message
    assert "deleted" in error.message
    assert not (models_dir / "checkpoints" / "tiny.safetensors").exists() and not leftovers(models_dir)


def test_corrupted_byte_is_caught_by_the_hub_etag_without_a_registry_sha(hub, models_dir):
    bundle, _ = make_bundle(hub, registry_sha=False)
    hub.corrupt_at = 7
    with pytest.raises(ImagegenError, match="sha256 expected") as failed:
        fetch_events(bundle, models_dir)
    assert failed.value.code == "checksum_mismatch" and not leftovers(models_dir)


def test_registry_size_differing_from_the_hub_fails_before_any_transfer(hub, models_dir):
    bundle, data = make_bundle(hub)
    file = bundle.files["checkpoint"]
    wrong = Bundle(name="tiny", family="sd15",
                   files={"checkpoint": ModelFile(**{**file.__dict__, "size": len(data) + 1})})
    with pytest.raises(ImagegenError) as failed:
        fetch_events(wrong, models_dir)
    assert failed.value.code == "checksum_mismatch"
    assert f"expected {len(data) + 1}, got {len(data)}" in failed.value.message
    assert not hub.gets()


def test_server_sending_more_bytes_than_announced_is_refused(hub, models_dir):
    bundle, _ = make_bundle(hub, registry_size=False)
    hub.extra_bytes = b"junk"
    with pytest.raises(ImagegenError) as failed:
        fetch_events(bundle, models_dir)
    assert failed.value.code == "checksum_mismatch" and "size" in failed.value.message
    assert not (models_dir / "checkpoints" / "tiny.safetensors").exists() and not leftovers(models_dir)


def _no_token_anywhere(error: ImagegenError, events: list[dict]) -> None:
    text = json.dumps(error.to_json()) + json.dumps(events) + str(error)
    assert TOKEN not in text


def test_gated_model_without_token_fails_before_any_request(hub, models_dir):
    bundle, _ = make_bundle(hub, repo="gated-org/model", gated=True)
    hub.gated["gated-org/model"] = (TOKEN, 403)
    events: list[dict] = []
    with pytest.raises(ImagegenError) as failed:
        fetch.fetch_bundle(bundle, models_dir, events.append)
    error = failed.value
    assert error.code == "gated_model" and "https://huggingface.co/gated-org/model" in error.message
    assert "HF_TOKEN" in error.hint and not hub.requests
    assert events[-1]["event"] == "error" and events[-1]["code"] == "gated_model"


@pytest.mark.parametrize("token, status, says", [(None, 401, "no Hugging Face token"),
                                                 ("hf_wrong", 401, "refused"),
                                                 ("hf_wrong", 403, "no access")])
def test_gated_repo_answers_401_or_403(hub, models_dir, monkeypatch, token, status, says):
    bundle, _ = make_bundle(hub, repo="gated-org/model")  # the registry does not know it is gated
    hub.gated["gated-org/model"] = (TOKEN, status)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    events: list[dict] = []
    with pytest.raises(ImagegenError) as failed:
        fetch.fetch_bundle(bundle, models_dir, events.append)
    assert failed.value.code == "gated_model" and says in failed.value.message
    assert "https://huggingface.co/gated-org/model" in failed.value.message and "HF_TOKEN" in failed.value.hint
    assert [r.status for r in hub.requests if r.path.startswith("/gated-org")] == [status] and not hub.gets()
    _no_token_anywhere(failed.value, events)


def test_gated_repo_with_the_token_downloads_and_keeps_the_token_off_the_cdn(hub, models_dir, monkeypatch):
    bundle, data = make_bundle(hub, repo="gated-org/model", gated=True)
    hub.gated["gated-org/model"] = (TOKEN, 403)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _, events = fetch_events(bundle, models_dir)
    assert (models_dir / "checkpoints" / "tiny.safetensors").read_bytes() == data
    [head] = [r for r in hub.requests if r.method == "HEAD"]
    [get] = hub.gets()
    assert head.authorized and not get.authorized and TOKEN not in json.dumps(events)


def test_slow_server_sends_throttled_progress(hub, models_dir):
    bundle, _ = make_bundle(hub, size=2 * 1024 * 1024)
    hub.delay = 0.025  # 32 chunks of 64 KiB: ~0.8 s
    _, events = fetch_events(bundle, models_dir)
    progress = [e["bytes"] for e in events if e["event"] == "progress"]
    assert 2 <= len(progress) < 32 // 2, progress
    assert progress == sorted(progress) and progress[-1] < 2 * 1024 * 1024
    assert all(e["total"] == 2 * 1024 * 1024 for e in events if e["event"] == "start")


def test_ctrl_c_mid_download_leaves_no_file_under_the_final_name_and_a_rerun_continues(hub, models_dir, monkeypatch):
    bundle, data = make_bundle(hub)
    monkeypatch.setattr(fetch, "PROGRESS_INTERVAL", 0)
    hub.delay = 0.01

    def press_ctrl_c(event):
        events.append(event)
        if event["event"] == "progress" and event["bytes"] >= 3 * 65536:
            raise KeyboardInterrupt

    events: list[dict] = []
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_bundle(bundle, models_dir, press_ctrl_c)
    assert events[-1]["event"] == "error" and events[-1]["code"] == "interrupted"
    assert not (models_dir / "checkpoints" / "tiny.safetensors").exists()
    [part] = leftovers(models_dir)
    kept = part.stat().st_size
    assert kept >= 3 * 65536

    hub.requests.clear()
    fetch_events(bundle, models_dir)
    assert (models_dir / "checkpoints" / "tiny.safetensors").read_bytes() == data
    assert [g.range for g in hub.gets()] == [f"bytes={kept}-"]


def test_too_little_free_space_fails_before_any_transfer(hub, models_dir, monkeypatch):
    bundle, _ = make_bundle(hub)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ImagegenError) as failed:
        fetch_events(bundle, models_dir)
    error = failed.value
    assert error.code == "disk_full" and str(models_dir) in error.message and "short by" in error.message
    assert error.details["shortfall"] == SIZE - 1000 and not hub.gets()


def test_concurrent_fetches_in_threads_transfer_once(hub, models_dir):
    bundle, data = make_bundle(hub)
    hub.delay, hub.wait_for_heads = 0.02, 2
    results, logs = [None, None], [[], []]

    def run(index):
        results[index] = fetch.fetch_bundle(bundle, models_dir, logs[index].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results[0] == results[1] and results[0]["checkpoint"].read_bytes() == data
    assert len(hub.gets()) == 1
    waited = [log for log in logs if any(e["event"] == "waiting" for e in log)]
    assert len(waited) == 1 and waited[0][-1]["cached"]


def _user_models_yaml(home: Path, hub: HubServer, name: str, repo: str, filename: str, data: bytes) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.yaml").write_text(
        f"schema: 1\nmodels:\n  {name}:\n    family: sd15\n    files:\n      checkpoint:\n"
        f"        repo: {repo}\n        file: {filename}\n        revision: main\n        folder: checkpoints\n"
        f"        size: {len(data)}\n        sha256: {hashlib.sha256(data).hexdigest()}\n")


def test_concurrent_entrypoint_fetches_in_two_processes_transfer_once(hub, models_dir, isolated_home):
    data = os.urandom(SIZE)
    hub.add("org/tiny", "tiny.safetensors", data)
    _user_models_yaml(isolated_home, hub, "tiny", "org/tiny", "tiny.safetensors", data)
    hub.delay, hub.wait_for_heads = 0.05, 2  # the first transfer starts once both have asked, and lasts 0.5 s
    command = [sys.executable, str(REPO / "entrypoint.py"), "fetch", "tiny", "--models-dir", str(models_dir)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ, cwd=REPO)
             for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-2000:] for o in outputs]
    logs = [[json.loads(line) for line in out.decode().splitlines()] for out, _ in outputs]
    assert all(log[-1] == {"event": "bundle_done", "model": "tiny"} for log in logs)
    assert (models_dir / "checkpoints" / "tiny.safetensors").read_bytes() == data
    assert len(hub.gets()) == 1
    assert sum(any(e["event"] == "waiting" for e in log) for log in logs) == 1


def test_entrypoint_fetch_reports_an_error_as_the_last_json_line(hub, models_dir, isolated_home):
    data = os.urandom(1000)
    hub.add("org/tiny", "tiny.safetensors", data)
    _user_models_yaml(isolated_home, hub, "tiny", "org/tiny", "tiny.safetensors", data + b"x")  # wrong sha/size
    result = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "fetch", "tiny",
                             "--models-dir", str(models_dir)],
                            capture_output=True, env=os.environ, cwd=REPO, timeout=60)
    last = json.loads(result.stdout.decode().splitlines()[-1])
    assert result.returncode == 1 and last["event"] == "error" and last["code"] == "checksum_mismatch"


def test_offline_mode_refuses_to_download(hub, models_dir, monkeypatch):
    bundle, _ = make_bundle(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImagegenError, match="HF_HUB_OFFLINE") as failed:
        fetch_events(bundle, models_dir)
    assert failed.value.code == "model_missing" and not hub.requests


def test_missing_file_on_the_hub_is_a_download_failure(hub, models_dir):
    bundle, _ = make_bundle(hub)
    file = bundle.files["checkpoint"]
    missing = Bundle(name="tiny", family="sd15",
                     files={"checkpoint": ModelFile(**{**file.__dict__, "path_in_repo": "nope.safetensors"})})
    with pytest.raises(ImagegenError, match="does not exist") as failed:
        fetch_events(missing, models_dir)
    assert failed.value.code == "download_failed"


@pytest.mark.parametrize("layout", ["comfyui", "a1111"])
def test_a_shared_model_tree_is_used_instead_of_downloading(hub, models_dir, tmp_path, monkeypatch, layout):
    bundle, data = make_bundle(hub)
    tree = tmp_path / "shared-models"
    folder = tree / ("checkpoints" if layout == "comfyui" else "Stable-diffusion")
    folder.mkdir(parents=True)
    (folder / "tiny.safetensors").write_bytes(data)
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", os.pathsep.join([str(tmp_path / "absent"), str(tree)]))
    file = bundle.files["checkpoint"]
    assert cache.present_path(file, models_dir) == folder / "tiny.safetensors"
    assert cache.missing_files(bundle, models_dir) == []
    result, _ = fetch_events(bundle, models_dir)
    assert result["checkpoint"] == folder / "tiny.safetensors" and not hub.requests

    (folder / "tiny.safetensors").write_bytes(data[:-1])  # same name, another file: not used
    assert cache.present_path(file, models_dir) is None


def test_a_file_placed_in_the_cache_by_hand_is_verified_once(hub, models_dir, monkeypatch):
    bundle, data = make_bundle(hub)
    path = models_dir / "checkpoints" / "tiny.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    _, events = fetch_events(bundle, models_dir)
    assert [e["event"] for e in events] == ["verifying", "done"] and not hub.requests
    monkeypatch.setattr(fetch, "sha256_file", lambda p: pytest.fail("hashed twice"))
    fetch_events(bundle, models_dir)

    path.write_bytes(os.urandom(SIZE))  # replaced: size and mtime no longer match the ledger
    monkeypatch.undo()
    with pytest.raises(ImagegenError) as failed:
        fetch_events(bundle, models_dir)
    assert failed.value.code == "checksum_mismatch" and not path.exists()


def test_make_fetcher_plugs_into_ensure_bundle(hub, models_dir):
    bundle, data = make_bundle(hub)
    events: list[dict] = []
    with pytest.raises(ImagegenError, match="is missing"):
        cache.ensure_bundle(bundle, None, models_dir)
    resolved = cache.ensure_bundle(bundle, fetch.make_fetcher(events.append, models_dir), models_dir)
    assert resolved["checkpoint"].read_bytes() == data and events[-1]["event"] == "done"


def test_tqdm_renderer_draws_one_bar_per_file(hub, models_dir, tmp_path):
    from imagegen.models.fetch_progress import TqdmRenderer

    bundle, _ = make_bundle(hub)
    out = (tmp_path / "stderr.txt").open("w+")
    renderer = TqdmRenderer(bars=True, stream=out)
    fetch.fetch_bundle(bundle, models_dir, renderer)
    renderer.close()
    out.seek(0)
    text = out.read()
    assert "tiny.safetensors" in text and "100%" in text and "verified" in text


def test_models_pull_json_through_the_cli(hub, isolated_home):
    data = os.urandom(SIZE)
    hub.add("org/tiny", "tiny.safetensors", data)
    _user_models_yaml(isolated_home, hub, "tiny", "org/tiny", "tiny.safetensors", data)
    result = subprocess.run([sys.executable, str(REPO / "generate_image.py"), "models", "pull", "tiny", "--json"],
                            capture_output=True, env=os.environ, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    lines = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert {line["schema"] for line in lines[:-1]} == {"imagegen.fetch_event/1"}
    assert lines[-1]["schema"] == "imagegen.model_pulled/1"
    assert Path(lines[-1]["files"]["checkpoint"]).read_bytes() == data


def test_models_pull_gated_error_through_the_cli(hub, isolated_home):
    data = os.urandom(1000)
    hub.add("gated-org/model", "tiny.safetensors", data)
    hub.gated["gated-org/model"] = (TOKEN, 403)
    _user_models_yaml(isolated_home, hub, "tiny", "gated-org/model", "tiny.safetensors", data)
    result = subprocess.run([sys.executable, str(REPO / "generate_image.py"), "models", "pull", "tiny"],
                            capture_output=True, env={**os.environ, "HF_TOKEN": "hf_not_the_right_one"}, cwd=REPO,
                            timeout=60)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "https://huggingface.co/gated-org/model" in stderr and "HF_TOKEN" in stderr
    assert "hf_not_the_right_one" not in stderr + result.stdout.decode() and not result.stdout


@pytest.mark.comfyui
def test_models_pull_tiny_sd15_from_the_test_hub(hub, isolated_home, tiny_sd15):
    """The done-criterion's first half: `imagegen models pull` downloads and verifies a real checkpoint."""
    data = tiny_sd15.read_bytes()
    hub.add("imagegen-test/tiny-sd15", "tiny-sd15.safetensors", data)
    _user_models_yaml(isolated_home, hub, "tiny-sd15", "imagegen-test/tiny-sd15", "tiny-sd15.safetensors", data)
    result = subprocess.run([sys.executable, str(REPO / "generate_image.py"), "models", "pull", "tiny-sd15"],
                            capture_output=True, env=os.environ, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    path = Path(result.stdout.decode().strip())
    assert path == isolated_home / "models" / "checkpoints" / "tiny-sd15.safetensors"
    assert path.stat().st_size == len(data)
    assert "verified" in result.stderr.decode()
    ledger = json.loads((isolated_home / "models" / LEDGER).read_text())
    assert ledger["checkpoints/tiny-sd15.safetensors"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_cancelled_scope_stops_the_transfer_without_retrying(hub, models_dir, monkeypatch):
    """An MCP cancellation (util/cancel) raised from the progress callback used to be caught by the
    resume loop, which went on downloading the rest of the file."""
    import threading

    from imagegen.util import cancel

    bundle, _data = make_bundle(hub)
    monkeypatch.setattr(fetch, "PROGRESS_INTERVAL", 0)
    hub.delay = 0.01
    stop = threading.Event()
    events: list[dict] = []

    def on_event(event):
        events.append(event)
        if event["event"] == "progress" and event["bytes"] >= 3 * 65536:
            stop.set()  # the client gave up: the next event is where the transfer stops

    with cancel.scope(stop), pytest.raises(ImagegenError) as caught:
        fetch.fetch_bundle(bundle, models_dir, on_event)
    assert caught.value.code == "interrupted" and "download" in caught.value.message
    assert len(hub.gets()) == 1  # not resumed behind the caller's back
    assert events[-1]["event"] == "error" and events[-1]["code"] == "interrupted"
    assert not (models_dir / "checkpoints" / "tiny.safetensors").exists()
    [part] = leftovers(models_dir)
    assert 3 * 65536 <= part.stat().st_size < SIZE
    fetch_events(bundle, models_dir)  # outside the scope: nothing stops it, and it resumes
    assert (models_dir / "checkpoints" / "tiny.safetensors").is_file()
