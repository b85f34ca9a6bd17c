"""Batch input (read line by line, with a bound), planning, output names and the manifest, without workers."""

import io
import json
import os

import pytest

from imagegen.engine import batch
from imagegen.engine.scheduler import Job, JobQueue, WorkerState, prefer_loaded_model
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError


def test_plain_lines_and_jsonl_items():
    items = batch.parse_items('a red fox\n\n# a comment\n{"prompt": "a cat", "seed": 3, "count": 2}\n')
    assert [(i.line, i.fields) for i in items] == [(1, {"prompt": "a red fox"}),
                                                   (4, {"prompt": "a cat", "seed": 3, "count": 2})]


@pytest.mark.parametrize("text, fragment", [('{"prompt": "x",}', "line 1: not valid JSON"),
                                            ('ok\n{"seed": 1}', "line 2: a JSON item needs"),
                                            ('{"prompt": "x", "colour": "red"}', "unknown field(s) colour"),
                                            ("\n# only comments\n", "no prompts")])
def test_bad_input_names_the_line(text, fragment):
    with pytest.raises(ImagegenError) as caught:
        batch.parse_items(text)
    assert fragment in caught.value.message and caught.value.exit_code == 2


@pytest.mark.parametrize("name", ["../evil.png", "a/b.png", "/etc/passwd", ".hidden.png", "..", "x\0.png"])
def test_output_names_cannot_escape_the_directory(name):
    with pytest.raises(ImagegenError, match="plain file name"):
        batch.safe_name(name, "line 1")


def test_plans_are_stable_across_runs_and_validated_per_line(tmp_path):
    items = batch.parse_items('a fox\n{"prompt": "a cat", "count": 3, "output": "cat", "model": "sdxl", '
                              '"size": "768x512"}\n')
    first = batch.plan(items, tmp_path, {"model": "sd15"}, 0, pack=1)
    second = batch.plan(items, tmp_path, {"model": "sd15"}, 0, pack=1)
    assert [j.key for j in first] == [j.key for j in second] and len(first) == 4
    assert [j.params.seed for j in first] == [j.params.seed for j in second]
    assert [t.name for j in first[1:] for t in j.targets] == ["cat-1.png", "cat-2.png", "cat-3.png"]
    assert first[1].bundle.name == "sdxl" and (first[1].params.width, first[1].params.height) == (768, 512)
    assert batch.plan(items, tmp_path, {"model": "sd15"}, 1, pack=1)[0].params.seed != first[0].params.seed
    packed = batch.plan(items, tmp_path, {"model": "sd15"}, 0, pack=2)
    assert [j.params.batch_size for j in packed] == [1, 2, 1] and len(packed[1].targets) == 2
    fast = batch.plan(items, tmp_path, {"model": "sd15", "fast": True}, 0, pack=1)
    assert all(j.params.fast for j in fast) and [j.key for j in fast] == [j.key for j in first], \
        "--fast changes how, not what: a rerun resumes"
    with pytest.raises(ImagegenError, match="line 1: fast must be true or false"):
        batch.plan(batch.parse_items('{"prompt": "x", "fast": "yes"}'), tmp_path, {"model": "sd15"}, 0, pack=1)
    bad = batch.parse_items('ok\n{"prompt": "x", "size": "65x64"}')
    with pytest.raises(ImagegenError, match="line 2: width 65"):
        batch.plan(bad, tmp_path, {"model": "sd15"}, 0, pack=1)


def test_queue_keeps_a_worker_on_its_loaded_model():
    registry = Registry.load()
    jobs = [Job(key=str(i), bundle=registry.get(name), params=None, targets=[])
            for i, name in enumerate(["sd15", "sdxl", "sdxl", "sd15"])]
    worker = WorkerState("0", last_bundle="sd15")
    assert prefer_loaded_model(worker, jobs).key == "0"
    worker.last_bundle = None
    assert prefer_loaded_model(worker, jobs).bundle.name in ("sd15", "sdxl")
    queue = JobQueue(jobs)
    taken = [queue.take(WorkerState("0", last_bundle="sdxl"), block=False).key for _ in range(2)]
    assert taken == ["1", "2"]
    jobs[1].attempts = 1
    queue.settle(jobs[1], requeue=True)
    assert queue.take(WorkerState("1"), block=False).key == "1"  # a requeued job goes first


def test_manifest_ignores_a_truncated_line_and_missing_files(tmp_path):
    manifest = batch.Manifest(tmp_path)
    present = tmp_path / "a.png"
    present.write_bytes(b"x")
    manifest.append([{"key": "k1", "status": "done", "path": str(present)},
                     {"key": "k2", "status": "done", "path": str(tmp_path / "gone.png")},
                     {"key": "k3", "status": "failed", "path": str(present)}])
    with open(manifest.path, "a") as handle:
        handle.write('{"key": "k4", "status": "do')
    jobs = [Job(key=k, bundle=None, params=None, targets=[tmp_path / name]) for k, name in
            (("k1", "a.png"), ("k2", "gone.png"), ("k3", "a.png"), ("k4", "a.png"))]
    assert manifest.finished(manifest.read(), jobs) == {"k1"}
    assert manifest.unreadable == [4]


def test_manifest_skips_lines_that_are_not_whole_records_with_one_warning(tmp_path):
    present = tmp_path / "a.png"
    present.write_bytes(b"x")
    good = json.dumps({"key": "k1", "status": "done", "path": str(present)})
    (tmp_path / batch.MANIFEST).write_bytes("\n".join([
        good, json.dumps({"status": "done", "path": str(present)}), "not json at all", "[1, 2]", '"a string"',
        "\xff\xfe", json.dumps({"key": 7, "status": "done", "path": "x"}), '{"key": "k2", "sta'
    ]).encode("utf-8", "surrogateescape"))
    manifest = batch.Manifest(tmp_path)
    assert manifest.read() == [json.loads(good)]
    assert manifest.unreadable == [2, 3, 4, 5, 6, 7, 8]
    assert manifest.warning().count("warning:") == 1
    assert "skipped 7 unreadable line(s) (first: line 2)" in manifest.warning()


def test_a_line_appended_after_a_cut_off_line_is_kept_and_each_append_is_one_write(tmp_path, monkeypatch):
    manifest = batch.Manifest(tmp_path)
    manifest.path.write_text('{"key": "k0", "status": "do')  # SIGKILL mid-write in an old version
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    manifest.append([{"key": "k1", "status": "done", "path": "a.png", "index": i} for i in range(3)])
    assert len(writes) == 1 and writes[0].startswith(b"\n") and writes[0].endswith(b"\n")
    assert writes[0].count(b"\n") == 4
    assert [(r["key"], r["index"]) for r in manifest.read()] == [("k1", 0), ("k1", 1), ("k1", 2)]
    assert manifest.unreadable == [1]


def test_a_rerun_keeps_exactly_one_line_per_finished_image(tmp_path):
    kept, gone = tmp_path / "kept.png", tmp_path / "gone.png"
    kept.write_bytes(b"x")
    manifest = batch.Manifest(tmp_path)
    done = {"key": "k1", "status": "done", "path": str(kept)}
    manifest.append([{"key": "k1", "status": "failed", "path": str(kept)}, done, done,
                     {"key": "k2", "status": "done", "path": str(gone)},
                     {"key": "k3", "status": "failed", "path": "x.png"},
                     {"key": "other", "status": "done", "path": "elsewhere.png"}])
    with open(manifest.path, "a") as handle:
        handle.write("garbage\n")
    jobs = [Job(key=k, bundle=None, params=None, targets=[t])
            for k, t in (("k1", kept), ("k2", gone), ("k3", tmp_path / "x.png"))]
    records = manifest.read()
    finished = manifest.finished(records, jobs)
    assert finished == {"k1"}
    manifest.compact(records, jobs, finished)
    assert manifest.read() == [done, {"key": "other", "status": "done", "path": "elsewhere.png"}]
    assert manifest.unreadable == []
    before = manifest.path.stat().st_mtime_ns
    manifest.compact(manifest.read(), jobs, finished)
    assert manifest.path.stat().st_mtime_ns == before, "nothing to drop: the file is left alone"


def test_a_prompt_line_over_the_limit_is_refused_while_reading(monkeypatch):
    class Endless(io.TextIOBase):
        """A stream with no end of line: reading it whole would never finish."""

        def readline(self, limit=-1):
            assert 0 < limit <= batch.MAX_LINE_CHARS + 2, "each line is read with a bound"
            return "a" * limit

    with pytest.raises(ImagegenError) as caught:
        batch.read_items(Endless(), "stdin")
    assert caught.value.code == "invalid_prompt" and caught.value.message.startswith("stdin line 1: longer than")
    text = "ok\n" + "b" * (batch.MAX_LINE_CHARS + 1) + "\n"
    assert "stdin line 2: longer than" in pytest.raises(ImagegenError, batch.parse_items, text).value.message
    assert len(batch.parse_items("ok\r\n" + "c" * batch.MAX_LINE_CHARS + "\r\nthird\n")) == 3


def test_an_output_link_leading_out_of_the_folder_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "castle.png").symlink_to(tmp_path / "victim.png")
    items = batch.parse_items('a\n{"prompt": "x", "output": "castle"}')
    with pytest.raises(ImagegenError) as caught:
        batch.plan(items, out, {"model": "sd15"}, 0, pack=1)
    assert caught.value.exit_code == 2 and caught.value.message.startswith("line 2: output")
    assert "leads outside" in caught.value.message


def test_the_cli_refuses_an_overlong_line_without_waiting_for_the_end_of_stdin(tmp_path, isolated_home):
    """The writer keeps stdin open: a CLI that read stdin whole first would wait for ever."""
    import subprocess
    import sys
    import threading

    from conftest import REPO

    process = subprocess.Popen([sys.executable, str(REPO / "generate_image.py"), "batch", "-o", str(tmp_path / "out"),
                                "--json"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stop = threading.Event()

    def feed() -> None:
        try:
            process.stdin.write(b"a fox\n")
            while not stop.is_set():
                process.stdin.write(b"x" * 65536)
                process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        process.wait(timeout=120)  # not communicate(): it would close stdin, and the end of input must not be needed
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    finally:
        stop.set()
    stderr = process.stderr.read()
    assert process.returncode == 2, stderr.decode()
    error = json.loads(stderr.decode().strip().splitlines()[-1])
    assert error["code"] == "invalid_prompt" and error["message"].startswith("stdin line 2: longer than")


@pytest.mark.parametrize("name", ["../evil", "/tmp/evil.png", "sub/dir.png"])
def test_the_cli_refuses_an_output_name_that_leaves_the_folder_before_anything_starts(tmp_path, isolated_home, name):
    from conftest import run_cli

    out = tmp_path / "out"
    lines = f'ok\n{{"prompt": "x", "output": "{name}"}}\n'.encode()
    result = run_cli("batch", "-o", str(out), "-m", "sd15", input=lines, timeout=120)
    assert result.returncode == 2 and "line 2: output name" in result.stderr.decode()
    assert "hint:" in result.stderr.decode()
    assert not out.exists(), "nothing started, nothing written"


def test_an_output_folder_that_cannot_take_files_is_refused_before_anything_starts(isolated_home):
    from conftest import run_cli

    # /proc passes os.access for root but takes no files: only creating one proves a folder writable
    result = run_cli("batch", "-o", "/proc/imagegen-out", "-m", "sd15", "--json", input=b"a fox\n", timeout=120)
    assert result.returncode == 2, result.stderr.decode()
    error = json.loads(result.stderr.decode().strip().splitlines()[-1])
    assert error["code"] == "output_not_writable" and "/proc" in error["message"] and error["hint"]


def test_a_full_disk_mid_append_is_disk_full_and_leaves_no_half_line(tmp_path, monkeypatch):
    import errno

    manifest = batch.Manifest(tmp_path)
    manifest.append([{"key": "k1", "status": "done", "path": "a.png"}])
    before = manifest.path.read_bytes()
    real_write = os.write

    def short_then_full(fd, data):  # what a disk that fills during the write does: part of it, then ENOSPC
        if len(data) > 10:
            return real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(ImagegenError) as caught:
        manifest.append([{"key": "k2", "status": "done", "path": "b.png"}])
    monkeypatch.undo()
    assert caught.value.code == "disk_full" and str(manifest.path) in caught.value.message
    assert manifest.path.read_bytes() == before, "the cut-off line is taken back"


def test_an_items_lora_and_control_files_are_relative_to_the_prompts_file(tmp_path):
    line = json.dumps({"prompt": "a fox", "image": "in.png", "loras": ["styles/ink.safetensors:0.5"],
                       "controls": [{"model": "canny-sd15", "image": "edges.png", "strength": 0.6}]})
    (item,) = batch.read_items(io.StringIO(line + "\n"), "items.jsonl", tmp_path)
    assert item.fields["image"] == str(tmp_path / "in.png")
    assert item.fields["loras"] == [{"name": str(tmp_path / "styles/ink.safetensors"), "strength": 0.5}]
    assert item.fields["controls"][0]["image"] == str(tmp_path / "edges.png")
    assert item.fields["controls"][0]["strength"] == 0.6
