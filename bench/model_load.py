#!/usr/bin/env python3
"""Model-load throughput: ComfyUI loading a checkpoint in a worker, in GB/s, against `cat FILE > /dev/null`.

    IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/model_load.py [--runs 3] [--write]

The load is timed alone: a graph of CheckpointLoaderSimple → PreviewAny (an output node that only
prints the VAE's repr) is posted through a warm local worker's proxy, and the time between the
websocket's `executing` events for the loader and for the next node is the load (safetensors read,
model construction, fp16 → fp32 weights on CPU). Before each load the worker is told to unload
models and drop its node cache (POST /free), and the checkpoint is offered under a fresh symlink
name, so nothing is reused. `cat` reads the same file.

Two files: the tiny test checkpoint (one-level UNet + full CLIP-L and VAE, ~0.47 GB) and a
full-size random-weight SD1.5 checkpoint (~2.1 GB fp16, the size of the real
v1-5-pruned-emaonly-fp16), built once into .cache/fixtures/ (about a minute, never committed).
Each is measured with the OS file cache dropped first (`echo 3 > /proc/sys/vm/drop_caches`, when
this process may; otherwise that row says so) and warm, the two readers taking turns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

SECTION = "model-load"
FULL_NAME = "bench-sd15-full.safetensors"


def build_full_sd15(target: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint with SD1.5's full architecture (UNet 320×[1,2,4,4], two res
    blocks per level, attention at the first three levels; CLIP-L; the KL VAE), weights fp16."""
    sys.path.insert(0, str(c.REPO / "tests"))
    from tiny_models import _comfy_on_path, _randomize  # noqa: PLC0415 - the test suite's own helpers, read-only

    comfy_dir = _comfy_on_path()
    import json

    import comfy.ops
    import torch
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init  # no init: the weights are replaced at once
    state = {}
    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                     channel_mult=(1, 2, 4, 4), num_heads=8, use_spatial_transformer=True,
                     transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                     transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=768,
                     use_linear_in_transformer=False, operations=ops, dtype=torch.float16)
    state.update({f"model.diffusion_model.{k}": v for k,
                  v in _randomize(unet.state_dict(), seed, torch.float16).items()})
    del unet
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    state.update({f"first_stage_model.{k}": v for k,
                  v in _randomize(vae.state_dict(), seed + 1, torch.float16).items()})
    config = json.loads((comfy_dir / "comfy" / "sd1_clip_config.json").read_text())
    clip = CLIPTextModel(config, dtype=torch.float16, device="cpu", operations=ops)
    state.update({f"cond_stage_model.transformer.{k}": v for k,
                  v in _randomize(clip.state_dict(), seed + 2, torch.float16).items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    save_file(state, str(tmp))
    os.replace(tmp, target)
    return target


def full_checkpoint() -> Path:
    target = Path(os.environ.get("IMAGEGEN_DEV_CACHE") or c.REPO / ".cache") / "fixtures" / FULL_NAME
    if not target.is_file():
        c.log(f"building a full-size random SD1.5 checkpoint at {target} (once; about a minute)")
        started = time.monotonic()
        subprocess.run([sys.executable, __file__, "--build", str(target)], check=True)
        c.log(f"  built {target.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f}s")
    return target


def can_drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def time_cat(path: Path) -> float:
    started = time.monotonic()
    subprocess.run(f"cat {str(path)!r} > /dev/null", shell=True, check=True)
    return time.monotonic() - started


class Loader:
    """Times CheckpointLoaderSimple alone in a warm worker."""

    def __init__(self, scratch: Path):
        import requests

        from imagegen.runtimes.local import LocalRuntime
        from imagegen.util import paths

        self.runtime = LocalRuntime(keep_warm=900)
        self.worker = self.runtime.ensure()  # the first GPU when there is one, else the CPU
        worker_pid = self.worker.info["pid"]
        self.comfy_pid = int(Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()[0])
        self.client = c.BareClient(self.worker.url, self.worker.token)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.worker.token}"
        self.links = paths.models_dir() / "checkpoints" / "bench-load"
        self.links.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def load(self, path: Path) -> tuple[float, float]:
        """(loader node seconds, execution_start → execution_success seconds)."""
        self.http.post(self.worker.url + "/free", json={"unload_models": True, "free_memory": True},
                       timeout=30).raise_for_status()
        time.sleep(0.5)  # the prompt worker acts on the flags when it wakes: let it, before the clock starts
        self.count += 1
        link = self.links / f"{path.stem}-{self.count}.safetensors"
        link.symlink_to(path)
        graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f"bench-load/{link.name}"}},
                 "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 2]}}}
        self.client.prepare()
        marks: dict = {}
        entry = self.client.run(graph, None, marks)
        nodes = dict((node, t) for node, t in marks["nodes"])
        stamps = {name: body.get("timestamp") for name, body in entry.get("status", {}).get("messages", [])}
        link.unlink()
        return nodes["show"] - nodes["ckpt"], (stamps["execution_success"] - stamps["execution_start"]) / 1000

    def close(self) -> None:
        self.client.close()
        self.runtime.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (default 3)")
    parser.add_argument("--no-full", action="store_true", help="only the tiny checkpoint (no 2.1 GB file)")
    parser.add_argument("--no-drop", action="store_true", help="never drop the OS file cache (warm reads only)")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait (up to 2 min) for the load average to fall below this")
    parser.add_argument("--write", action="store_true", help="write the section into docs/benchmarks.md")
    parser.add_argument("--build", metavar="PATH",
                        help="only build the full-size random-weight SD1.5 checkpoint at PATH, then exit")
    args = parser.parse_args()
    if args.build:
        build_full_sd15(Path(args.build))
        return 0
    files = [("tiny test checkpoint", c.tiny_checkpoint())]
    if not args.no_full:
        files.append(("full-size SD1.5 architecture, fp16", full_checkpoint()))
    load_before = c.wait_for_quiet(args.max_load)
    dropping = not args.no_drop and can_drop_caches()
    started = time.monotonic()
    results: dict[tuple[str, str, str], list[float]] = {}
    loads = []
    other = c.OtherLoad(lambda: [loader.worker.info["pid"], loader.comfy_pid] if loader else [])
    loader = None
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-load-") as tmp:
        os.environ["IMAGEGEN_HOME"] = str(Path(tmp) / "home")
        os.environ.pop("IMAGEGEN_MODELS_DIR", None)
        loader = Loader(Path(tmp))
        try:
            for _label, path in files:  # untimed: the first load of each file in this worker
                loader.load(path)
            other.__enter__()
            for index in range(args.runs):
                for label, path in files:
                    for cache in (["cold", "warm"] if dropping else ["warm"]):
                        order = ["cat", "comfy"] if index % 2 == 0 else ["comfy", "cat"]
                        for reader in order:
                            if cache == "cold":
                                drop_caches()
                            else:
                                time_cat(path)  # make sure it is all cached
                            if reader == "cat":
                                results.setdefault((label, cache, "cat"), []).append(time_cat(path))
                            else:
                                node, span = loader.load(path)
                                results.setdefault((label, cache, "comfy"), []).append(node)
                                results.setdefault((label, cache, "span"), []).append(span)
                    loads.append(c.load_average())
                    c.log(f"  run {index + 1}/{args.runs} {label}: " + ", ".join(
                        f"{cache} {reader} {results[(label, cache, reader)][-1]:.2f}s"
                        for cache in (["cold", "warm"] if dropping else ["warm"])
                        for reader in ("cat", "comfy")) + f" (load {loads[-1]:.2f})")
            other.__exit__()
        finally:
            device = loader.worker.device
            loader.close()
    total = time.monotonic() - started
    rows = []
    for label, path in files:
        size = path.stat().st_size
        for cache in (["cold", "warm"] if dropping else ["warm"]):
            cat, comfy, span = (statistics.median(results[(label, cache, k)]) for k in ("cat", "comfy", "span"))
            rows.append([f"{label} ({size / 1e9:.2f} GB)", {"cold": "dropped first", "warm": "warm"}[cache],
                         f"{cat:.2f} s = {size / cat / 1e9:.2f} GB/s", f"{comfy:.2f} s = {size / comfy / 1e9:.2f} GB/s",
                         f"{span:.2f}", f"{comfy / cat:.1f}×"])
    date = c.now_stamp()
    command = "IMAGEGEN_COMFYUI_DIR=... ~/.cache/imagegen-dev/venv/bin/python bench/model_load.py" + (
        " " + " ".join(a for a in sys.argv[1:]) if sys.argv[1:] else "")
    cache_line = ("The OS file cache was dropped before each *cold* read (`sync; echo 3 > /proc/sys/vm/drop_caches`, "
                  "as root)."
                  if dropping
                  else "The OS file cache could not be dropped here (or `--no-drop`): warm reads only, for both "
                  "readers.")
    section = "\n".join([
        "## Model-load throughput" + ("" if device == "cpu" else f" ({device})"), "",
        f"`{command}` — {date}, {total:.0f} s in all.  ",
        f"Machine: {c.machine()}; {c.comfyui_version()}. Load average {load_before:.2f} at the start, "
        f"{min(loads):.2f}–{max(loads):.2f} during the runs; {other.describe()}.  ",
        f"{args.runs} repetitions of each, `cat` and ComfyUI taking turns; medians. {cache_line}", "",
        c.md_table(["file", "OS file cache", "`cat FILE > /dev/null`",
                    "ComfyUI CheckpointLoaderSimple (in a warm worker)",
                    "whole job, s", "ComfyUI / cat"], rows, "---|---|---:|---:|---:|---:"), "",
        "How to read it:", "",
        "- The ComfyUI figure is the loader node alone (websocket `executing` events around it) in a CPU worker: "
        "read the",
        "  safetensors file, build the UNet, CLIP and VAE, and copy the fp16 weights into fp32 modules "
        "(CPU runs fp32).",
        "  *Whole job* adds ComfyUI's graph handling and the trivial output node.",
        "- *Dropped first* drops this VM's page cache; the host behind its virtual disk may still cache the file, so",
        "  the cold `cat` figure is the disk as this machine sees it, not necessarily a physical disk's speed.",
        "- On a GPU, ComfyUI keeps the fp16 weights and moves them to the device when the model is first used, so",
        "  the published 1–4 GB/s (../shared/REFERENCE.md) is a different path; this is the CPU figure only.",
        "- imagegen adds nothing to a load: the job goes to ComfyUI unchanged. What it can do is keep the model "
        "resident",
        "  between jobs (a warm worker) so the load is paid once.",
    ])
    print(section)
    if args.write:
        c.write_section(SECTION if device == "cpu" else f"{SECTION}-{device}", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
