"""State stores (util/paths): concurrent learners in threads and processes all keep their update."""

import json
import subprocess
import sys
import threading

from imagegen.engine import timings
from imagegen.engine.routing import SPEEDS
from imagegen.util import paths


def test_update_state_from_many_threads_loses_nothing():
    def learn(thread: int) -> None:
        for i in range(25):
            paths.update_state("counts.json", lambda store, key=f"{thread}-{i}", value=i: store.update({key: value}))

    threads = [threading.Thread(target=learn, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(paths.read_state("counts.json")) == 8 * 25
    assert not [p.name for p in paths.state_dir().iterdir() if p.name.endswith((".partial", ".tmp"))]


def test_timings_and_speeds_from_two_processes_lose_nothing():
    """Two processes learn timings (timings.record) and worker speeds (Router.remember) at once."""
    code = """if True:
        import sys
        from types import SimpleNamespace
        from imagegen.engine import timings
        from imagegen.engine.routing import Router
        side = sys.argv[1]
        for i in range(40):
            timings.record(f"{side}{i}", 512, 512, "cpu", {"loading": 1.0, "sampling": 2.0}, 4)
            Router.remember(SimpleNamespace(gpu=None, name=f"{side}{i}", slot=side, speed=0.5, samples=i))
    """
    procs = [subprocess.Popen([sys.executable, "-c", code, side], stderr=subprocess.PIPE) for side in "ab"]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    learned = timings.load_store()
    assert {f"{side}{i}|512x512|cpu" for side in "ab" for i in range(40)} <= set(learned)
    assert timings.estimate("a7", 512, 512, "cpu").step == 0.5
    speeds = json.loads((paths.state_dir() / SPEEDS).read_text())
    assert {f"{side}{i}" for side in "ab" for i in range(40)} <= set(speeds)


def test_a_corrupt_or_foreign_store_reads_as_empty():
    paths.state_dir().mkdir(parents=True)
    (paths.state_dir() / "timings.json").write_text("[1, 2]")
    assert paths.read_state("timings.json") == {}
    assert paths.update_state("timings.json", lambda store: store.update(x=1))
    assert paths.read_state("timings.json") == {"x": 1}
