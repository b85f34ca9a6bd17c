
import pytest

from imagegen.engine import batch
from imagegen.engine.scheduler import Job, JobQueue, WorkerState, prefer_loaded_model
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError


def test_plain_lines_and_jsonl_items():
    items = batch.parse_items('a red fox\n\n# a comment\n{"prompt": "a cat", "seed": 3, "count": 2}\n')
    assert [(i.line, i.fields) for i in items] == [(1, {"prompt": "a red fox"}), (4, {"prompt": "a cat", "seed": 3, "count": 2})]


@pytest.mark.parametrize("text, fragment", [('{"prompt": "x",}', "line 1: not valid JSON"), ('ok\n{"seed": 1}', 'line 2: a JSON item needs'),
                                            ('{"prompt": "x", "colour": "red"}', "unknown field(s) colour"), ("\n# only comments\n", "no prompts")])
def test_bad_input_names_the_line(text, fragment):
    with pytest.raises(ImagegenError) as caught:
        batch.parse_items(text)
    assert fragment in caught.value.message and caught.value.exit_code == 2


@pytest.mark.parametrize("name", ["../evil.png", "a/b.png", "/etc/passwd", ".hidden.png", "..", "x\0.png"])
def test_output_names_cannot_escape_the_directory(name):
    with pytest.raises(ImagegenError, match="plain file name"):
        batch.safe_name(name, "line 1")


def test_plans_are_stable_across_runs_and_validated_per_line(tmp_path):
    items = batch.parse_items('a fox\n{"prompt": "a cat", "count": 3, "output": "cat", "model": "sdxl", "size": "768x512"}\n')
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
    assert all(j.params.fast for j in fast) and [j.key for j in fast] == [j.key for j in first], "--fast changes how, not what: a rerun resumes"
    with pytest.raises(ImagegenError, match="line 1: fast must be true or false"):
        batch.plan(batch.parse_items('{"prompt": "x", "fast": "yes"}'), tmp_path, {"model": "sd15"}, 0, pack=1)
    bad = batch.parse_items('ok\n{"prompt": "x", "size": "65x64"}')
    with pytest.raises(ImagegenError, match="line 2: width 65"):
        batch.plan(bad, tmp_path, {"model": "sd15"}, 0, pack=1)


def test_queue_keeps_a_worker_on_its_loaded_model():
    registry = Registry.load()
    jobs = [Job(key=str(i), bundle=registry.get(name), params=None, targets=[]) for i, name in enumerate(["sd15", "sdxl", "sdxl", "sd15"])]
    worker = WorkerState("0", last_model="sd15")
    assert prefer_loaded_model(worker, jobs).key == "0"
    worker.last_model = None
    assert prefer_loaded_model(worker, jobs).bundle.name in ("sd15", "sdxl")
    queue = JobQueue(jobs)
    taken = [queue.take(WorkerState("0", last_model="sdxl"), block=False).key for _ in range(2)]
    assert taken == ["1", "2"]
    jobs[1].attempts = 1
    queue.settle(jobs[1], requeue=True)
    assert queue.take(WorkerState("1"), block=False).key == "1"  # a requeued job goes first


def test_manifest_ignores_a_truncated_line_and_missing_files(tmp_path):
    manifest = batch.Manifest(tmp_path)
    present = tmp_path / "a.png"
    present.write_bytes(b"x")
    manifest.append([{"key": "k1", "status": "done", "path": str(present)}, {"key": "k2", "status": "done", "path": str(tmp_path / "gone.png")},
                     {"key": "k3", "status": "failed", "path": str(present)}])
    with open(manifest.path, "a") as handle:
        handle.write('{"key": "k4", "status": "do')
    assert manifest.finished_keys() == {"k1"}
