"""Render speed: it/s and seconds per image, imagegen against bare ComfyUI, plain and in fast mode.

Per case (a model, a size, a step count), one phase after another on the same machine:

  bare        ComfyUI started by hand (`python main.py`, its default flags) and a minimal client
              (bench/_common.BareClient): one untimed image (model load), then N timed.
  imagegen    a local worker driven by imagegen.generate in this process: one untimed image,
              then N timed.
  --fast      the same worker in fast mode: the first image (torch.compile with an empty cache)
              timed on its own, then N timed; then a fresh worker process, whose first fast image
              compiles from the persistent cache imagegen keeps in the model cache.

    CPU (default): the tests' tiny SD1.5 (registered as bench-tiny-sd15) at 64x64, 10 steps.
    GPU:  python bench/render_speed.py --full /data/bench-models --write
          builds full-size random-weight models there (bench/full_models.py; minutes, ~37 GB)
          and runs SD1.5 512² 20 steps, SDXL 1024² 20 steps, Flux-dev 1024² 28 steps (fast mode:
          the weights cast to fp8, so fp8 matmuls on Ada/Hopper).
    Any:  --models-yaml FILE --case MODEL:WxH:STEPS[:FAST_MODEL] ...

With --write the table goes into docs/benchmarks.md (section render-speed), with the device,
ComfyUI version and date.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
FULL_CASES = ["bench-sd15:512x512:20", "bench-sdxl:1024x1024:20", "bench-flux-dev:1024x1024:28:bench-flux-dev-fp8"]


@dataclass
class Case:
    model: str
    size: str
    steps: int
    fast_model: str

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--case {text!r}: want MODEL:WxH:STEPS[:FAST_MODEL]")
        return cls(parts[0], parts[1], int(parts[2]), parts[3] if len(parts) == 4 else parts[0])

    @property
    def label(self) -> str:
        return f"{self.model} {self.size}, {self.steps} steps"


@dataclass
class Series:
    """Seconds per image (wall, as the caller sees it) and sampling it/s of one path."""
    walls: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    def add(self, wall: float, rate: float | None) -> None:
        self.walls.append(wall)
        if rate:
            self.rates.append(rate)

    @property
    def wall(self) -> float:
        return c.median(self.walls)

    @property
    def rate(self) -> float | None:
        return c.median(self.rates) if self.rates else None


def request(model: str, case: Case, seed: int, out: Path, fast: bool = False):
    from imagegen.engine import generate as gen

    return gen.Request(prompt=PROMPT, model=model, size=case.size, steps=case.steps, seed=seed, output=str(out),
                       fast=fast,
                       overwrite=True)


def run_bare(case: Case, runs: int, scratch: Path, device: str) -> Series:
    from imagegen.comfy import workflows
    from imagegen.engine import generate as gen
    from imagegen.models import cache
    from imagegen.util import paths

    planned = gen.plan(request(case.model, case, 1, scratch / "unused.png"))
    cache.ensure_bundle(planned.bundle)
    port, work = c.free_port(), scratch / f"bare-{case.model}"
    work.mkdir(parents=True, exist_ok=True)
    server = c.start_bare_comfy(port, work, paths.models_dir(), work / "comfyui.log", device)
    series = Series()
    try:
        c.wait_http(f"http://127.0.0.1:{port}/system_stats", timeout=600, process=server)
        client = c.BareClient(f"http://127.0.0.1:{port}")
        for index in range(runs + 1):
            params = planned.jobs[0]
            params.seed = 100 + index
            marks: dict = {}
            started = time.monotonic()
            client.run(workflows.build(planned.bundle, params), work / "out.png", marks)
            sampling = c.sampling_seconds(marks)
            if index:  # the first image loads the model
                series.add(time.monotonic() - started, (case.steps - 1) / sampling if sampling else None)
            c.log(f"  bare {case.model}: image {index}: {time.monotonic() - started:.2f}s")
        client.close()
    finally:
        c.stop_process(server)
    return series


def render(runtime, model: str, case: Case, seed: int, out: Path, fast: bool) -> tuple[float, float | None]:
    from imagegen.engine import generate as gen
    from imagegen.engine.progress import Reporter

    started = time.monotonic()
    (record,) = list(gen.generate(request(model, case, seed, out, fast), runtime, Reporter(quiet=True)))
    wall = time.monotonic() - started
    sampling = record["timings"].get("sampling")
    return wall, (case.steps - 1) / sampling if sampling else None


def run_imagegen(case: Case, runs: int, scratch: Path) -> dict:
    from imagegen.runtimes.local import LocalRuntime

    runtime = LocalRuntime(keep_warm=1800)
    out = scratch / "imagegen.png"
    found: dict = {"plain": Series(), "fast": Series()}
    try:
        runtime.ensure()
        started = time.monotonic()
        render(runtime, case.model, case, 1, out, fast=False)
        found["first_plain"] = time.monotonic() - started
        for index in range(runs):
            found["plain"].add(*render(runtime, case.model, case, 200 + index, out, fast=False))
        found["first_fast_cold"] = render(runtime, case.fast_model, case, 2, out, fast=True)[0]
        for index in range(runs):
            found["fast"].add(*render(runtime, case.fast_model, case, 300 + index, out, fast=True))
        c.log(f"  imagegen {case.model}: plain {found['plain'].wall:.2f}s, fast {found['fast'].wall:.2f}s per image; "
              f"first fast image {found['first_fast_cold']:.1f}s")
        runtime.stop()
        runtime.ensure()  # a fresh worker process: the compiled kernels come from the cache on disk
        found["first_fast_cached"] = render(runtime, case.fast_model, case, 3, out, fast=True)[0]
    finally:
        runtime.stop()
    return found


def fmt_rate(value: float | None) -> str:
    return f"{value:.2f}" if value else "—"


def rows_for(case: Case, bare: Series, found: dict) -> list[list[str]]:
    plain, fast = found["plain"], found["fast"]
    gain = f"{fast.rate / plain.rate:.2f}× it/s" if fast.rate and plain.rate else "—"
    return [
        [f"{case.label}: bare ComfyUI + minimal client", f"{bare.wall:.3f}", fmt_rate(bare.rate), "1.00", "—"],
        [f"{case.label}: imagegen", f"{plain.wall:.3f}", fmt_rate(plain.rate), f"{plain.wall / bare.wall:.3f}", "—"],
        [f"{case.label}: imagegen --fast ({case.fast_model})", f"{fast.wall:.3f}", fmt_rate(fast.rate),
         f"{fast.wall / bare.wall:.3f}", f"{plain.wall / fast.wall:.2f}× images/s, {gain}"],
        [f"{case.label}: first image on a warm worker, model not loaded — plain", f"{found['first_plain']:.1f}", "—",
         "—", "—"],
        [f"{case.label}: first --fast image, compile cache empty", f"{found['first_fast_cold']:.1f}", "—", "—",
         f"compiling costs {found['first_fast_cold'] - fast.wall:.1f}s once"],
        [f"{case.label}: first --fast image on a fresh worker, compile cache on disk",
         f"{found['first_fast_cached']:.1f}", "—", "—",
         f"{found['first_fast_cold'] / found['first_fast_cached']:.2f}× faster than an empty cache"],
    ]


def build_full(target: Path, models: str) -> Path:
    c.log(f"building full-size random-weight models in {target} (bench/full_models.py)")
    subprocess.run([sys.executable, str(c.REPO / "bench" / "full_models.py"), str(target), "--models", models,
                    "--scale", "full"],
                   check=True)
    return target / "models.yaml"


def install_models_yaml(source: Path, target: Path) -> None:
    """The benchmark's user registry, plus `bench-flux-dev-fp8`: the bf16 Flux file cast to fp8 on load
    (as the built-in flux-dev-fp8 does), unless an fp8 file was built under that name."""
    import yaml

    document = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    models = document.setdefault("models", {})
    if "bench-flux-dev" in models and "bench-flux-dev-fp8" not in models:
        flux = models["bench-flux-dev"]
        models["bench-flux-dev-fp8"] = {**flux, "description": "bench-flux-dev cast to fp8 on load",
                                        "defaults": {**(flux.get("defaults") or {}), "weight_dtype": "fp8_e4m3fn"}}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="timed images per path (default 6)")
    parser.add_argument("--case", action="append", default=[], help="MODEL:WxH:STEPS[:FAST_MODEL], repeatable")
    parser.add_argument("--models-yaml", type=Path, help="a user models.yaml registering the cases' models")
    parser.add_argument("--full", type=Path, metavar="DIR",
                        help="build full-size random-weight models in DIR and run the GPU cases")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait (up to 2 min) for the load average to fall below this")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    from imagegen.util.gpus import detect_device

    device = detect_device()
    # measure compiling on a CPU too (imagegen skips it there by default)
    os.environ.setdefault("IMAGEGEN_FAST_ON_CPU", "1")
    load_before = c.wait_for_quiet(args.max_load)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-speed-") as tmp:
        scratch = Path(tmp)
        os.environ["IMAGEGEN_HOME"] = str(scratch / "home")
        os.environ.pop("IMAGEGEN_MODELS_DIR", None)
        from imagegen.models import modelfile
        from imagegen.models.registry import add_user_model
        from imagegen.util import paths

        models_yaml = build_full(args.full, "sd15,sdxl,flux-dev") if args.full else args.models_yaml
        if models_yaml:
            install_models_yaml(models_yaml, paths.user_models_yaml())
        tiny = c.tiny_checkpoint()
        add_user_model("bench-tiny-sd15", tiny, modelfile.detect(modelfile.read_header(tiny)).family, force=True)
        cases = [Case.parse(text) for text in args.case or (FULL_CASES if args.full else ["bench-tiny-sd15:64x64:10"])]
        rows, other = [], c.OtherLoad()
        with other:
            for case in cases:
                c.log(f"case {case.label}")
                bare = run_bare(case, args.runs, scratch, device)
                rows += rows_for(case, bare, run_imagegen(case, args.runs, scratch))
    took = time.monotonic() - started
    table = c.md_table(["path", "s per image (median)", "it/s (median)", "vs bare", "fast-mode gain"], rows)
    command = " ".join(["python bench/render_speed.py", *sys.argv[1:]])
    # The two trailing spaces end a Markdown line without starting a paragraph.
    header = (f"`{c.ENV_PREFIX} {c.PYTHON} {command.removeprefix('python ')}` — {c.now_stamp()}, "
              f"{took:.0f} s in all.  \n"
              f"Machine: {c.machine()}; {c.comfyui_version()}. Load average {load_before:.2f} at the start; "
              f"{other.describe()} (the machine is shared).  \n"
              f"{args.runs} timed images per path after one untimed image; every image its own seed; "
              "the phases run one after another.\n")
    section = f"""## Render speed: imagegen vs bare ComfyUI, plain and fast mode

{header}
{table}

How to read it:

- *s per image* is the caller's wall time per image: for bare ComfyUI the minimal client's POST → PNG on
  disk, for imagegen a `generate()` call in this process (plan, worker lookup, job, fetch, tag, write).
  *it/s* is (steps − 1) over the sampling span (first progress event → the node after the sampler).
- *bare ComfyUI* is started by hand with its default flags (`--cpu` on a CPU: split attention); imagegen's
  CPU workers use PyTorch attention (`--use-pytorch-cross-attention`), which torch.compile needs to trace
  the model in one graph.
- On a CPU imagegen runs `--fast` jobs plain unless `IMAGEGEN_FAST_ON_CPU=1`, which this benchmark sets
  to measure compiling there.
- `bench-sd15`, `bench-sdxl` and `bench-flux-dev` are full-size random-weight models from
  `python bench/full_models.py DIR --models sd15,sdxl,flux-dev`, whose `DIR/models.yaml` is what
  `--models-yaml` takes (`--full DIR` does both); `bench-tiny-sd15` is the tests' tiny checkpoint.
- *--fast* adds a TorchCompileModel (inductor) node before the sampler and, for fp8 weights, ComfyUI's
  fp8 matmul (`fp8_e4m3fn_fast`; the GPU case's Flux runs its bf16 weights cast to fp8 on load). Its gain
  is steady-state images/s and it/s over plain imagegen on the same worker; the first image pays the
  compile, once per worker process and size. A fresh worker finds the compiled kernels in
  `<model cache>/.compile-cache` (inductor's FX graph and kernel caches, Triton's cache).
"""
    print(section)
    if args.write:
        c.write_section("render-speed", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
