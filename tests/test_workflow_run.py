"""`imagegen run WORKFLOW`: loading (API, UI, PNG), refusals before any worker starts, model resolution; then the
real CLI on real ComfyUI (CPU, tiny models): API and UI exports of the project's own graphs, the editor's shape,
img2img, upscale and LoRA chains, `--from`, a batch sweep that resumes after Ctrl-C, and MCP run_workflow."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, REPO, communicate, run_cli
from jsonschema import Draft202012Validator

from imagegen.comfy import graph_params, png, ui_graph, workflows
from imagegen.engine import workflow_models, workflow_run
from imagegen.engine.schema import RESULT
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError

EDITOR = Path(__file__).parent / "workflows" / "editor-txt2img.json"


def own_graph(ckpt: str = "tiny-sd15.safetensors", **extra) -> dict:
    bundle = Registry.load().get("sd15")  # its checkpoint is replaced below
    params = workflows.Params(prompt="a tiny fox", width=64, height=64, steps=2, cfg=7.0, sampler="euler",
                              scheduler="normal", seed=5, **extra)
    graph = workflows.build(bundle, params)
    graph["load_checkpoint"]["inputs"]["ckpt_name"] = ckpt
    return graph


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def idat(path) -> bytes:
    return b"".join(body for kind, body, _ in png.iter_chunks(Path(path).read_bytes()) if kind == b"IDAT")


def chunks(path) -> dict:
    return png.read_text_chunks(Path(path).read_bytes())


# --- before any worker ------------------------------------------------------------------------------------
def test_api_ui_and_png_workflows_load_to_the_same_graph(tmp_path):
    graph = own_graph()
    api = workflow_run.load(write(tmp_path / "api.json", graph))
    ui = workflow_run.load(write(tmp_path / "ui.json", ui_graph.from_api(graph)))
    wrapped = workflow_run.load(write(tmp_path / "prompt.json", {"prompt": graph, "client_id": "x"}))
    assert api.format == "api" and ui.format == "ui" and wrapped.graph == api.graph
    assert api.sha256 == hashlib.sha256((tmp_path / "api.json").read_bytes()).hexdigest()
    assert [n["class_type"] for n in ui.graph.values()] == [n["class_type"] for n in graph.values()]
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "made.png")
    data = png.add_text_chunks((tmp_path / "made.png").read_bytes(), {"prompt": json.dumps(graph)})
    (tmp_path / "made.png").write_bytes(data)
    from_png = workflow_run.load(tmp_path / "made.png")
    assert from_png.format == "png" and from_png.graph == api.graph and from_png.ui is None
    editor = json.loads(EDITOR.read_text())
    (tmp_path / "comfy.png").write_bytes(png.add_text_chunks(data, {"workflow": json.dumps(editor)}))
    assert workflow_run.load(tmp_path / "comfy.png").ui == editor  # a ComfyUI PNG's own UI graph is kept


@pytest.mark.parametrize("content,words", [
    (b"not json", "neither a PNG nor JSON"), (b"[1, 2]", "is not a ComfyUI workflow"),
    (b'{"foo": 1}', "neither the API format"), (b'{"nodes": "x", "links": []}', "neither the API format"),
    (b"", "neither a PNG nor JSON"), (json.dumps(own_graph())[:300].encode(), "neither a PNG nor JSON"),
    (json.dumps({"nodes": [{"id": 1, "type": "SaveImage", "inputs": [{"name": "images", "link": 5}]}],
                 "links": [[5, 2, 0, 1, 0, "IMAGE"]]}).encode(), "wf.json: node 1 (SaveImage): its input 'images'"),
    (json.dumps({"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["9", 0]}}}).encode(),
     "links to node '9'"),
    (json.dumps({"1": {"class_type": "EmptyLatentImage", "inputs": {}}}).encode(), "has no output node"),
    (json.dumps({"1": {"class_type": "EmptyLatentImage", "inputs": {}}, "2": {"class_type": "SaveLatent", "inputs": {
        "samples": ["1", 0]}}}).encode(), "saves no image: its output nodes write other files (SaveLatent (node 2))"),
])
def test_malformed_workflows_are_refused(tmp_path, content, words):
    (tmp_path / "wf.json").write_bytes(content)
    with pytest.raises(ImagegenError) as caught:
        workflow_run.load(tmp_path / "wf.json")
    assert caught.value.code == "invalid_workflow" and words in caught.value.message


def test_links_written_with_number_ids_are_links_by_string_id(tmp_path):
    graph = own_graph()
    graph = {str(index): node for index, node in enumerate(graph.values())}  # ids "0", "1", ...
    ids = {name: str(index) for index, name in enumerate(own_graph())}
    for node in graph.values():
        node["inputs"] = {k: [int(ids[v[0]]), v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
    loaded = workflow_run.load(write(tmp_path / "wf.json", graph))  # as a script might write them: [4, 0]
    links = [v for node in loaded.graph.values() for v in node["inputs"].values() if isinstance(v, list)]
    assert links and all(isinstance(link[0], str) for link in links)  # ComfyUI rejects number ids
    assert graph_params.well_known(loaded.graph)["prompt"]


def test_a_workflow_file_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "wf.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(own_graph()).encode())
    assert workflow_run.load(tmp_path / "wf.json").graph["sampler"]["class_type"] == "KSampler"


def test_model_files_resolve_from_registry_cache_shared_trees_and_local_paths(tmp_path, monkeypatch):
    registry = Registry.load()
    sd15 = registry.get("sd15").files["checkpoint"]
    file, name = workflow_models.resolve_file(sd15.filename, "checkpoints", registry)
    assert file == sd15 and file.downloadable and name == sd15.filename  # fetched like any model
    assert workflow_models.resolve_file("sd15", "checkpoints", registry)[1] == sd15.filename  # a bundle's name
    [job] = workflow_run.plan_jobs(workflow_run.load(EDITOR), {"checkpoint": "sd15"}, 1, [None], local_models=False)
    assert job.workflow.graph["4"]["inputs"]["ckpt_name"] == sd15.filename  # --set checkpoint=MODEL, no dot in it
    assert workflow_models.resolve_file("nope.safetensors", "checkpoints", registry) == (None, "nope.safetensors")
    tree = tmp_path / "comfy-models"
    (tree / "loras").mkdir(parents=True)
    (tree / "loras" / "mine.safetensors").write_bytes(b"x")
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", str(tree))
    assert workflow_models.resolve_file("mine.safetensors", "loras", registry)[0].folder == "loras"
    local = tmp_path / "my model.safetensors"
    local.write_bytes(b"y")
    file, name = workflow_models.resolve_file(str(local), "checkpoints", registry)
    assert file.local_path == str(local) and name == "imagegen-local/my model.safetensors"


def test_a_vae_loader_names_a_file_like_any_loader(tmp_path, monkeypatch):
    """VAELoader's list holds ComfyUI's own `pixel_space` beside the worker's files: a file name is not refused."""
    tree = tmp_path / "comfy-models"
    for folder in ("checkpoints", "vae"):
        (tree / folder).mkdir(parents=True)
        (tree / folder / f"my-{folder}.safetensors").write_bytes(b"x")
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", str(tree))
    graph = own_graph("my-checkpoints.safetensors")
    graph["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "my-vae.safetensors"}}
    graph["decode"]["inputs"]["vae"] = ["vae", 0]
    workflow = workflow_run.load(write(tmp_path / "wf.json", graph))
    [job] = workflow_run.plan_jobs(workflow, {}, 1, [None])
    assert job.bundle.files["vae.vae_name"].folder == "vae"
    local = tmp_path / "other-vae.safetensors"
    local.write_bytes(b"y")
    [job] = workflow_run.plan_jobs(workflow, {"vae.vae_name": str(local)}, 1, [None])
    assert job.bundle.files["vae.vae_name"].local_path == str(local)


def test_a_missing_model_is_listed_with_its_node_and_a_custom_node_by_class_before_any_worker(tmp_path):
    graph = own_graph("nowhere.safetensors")
    graph["up"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-Nothing.safetensors"}}
    env = {"IMAGEGEN_HOME": str(tmp_path / "home"), "IMAGEGEN_RUNTIME": "local"}
    missing = run_cli("run", str(write(tmp_path / "wf.json", graph)), "--json", env=env)
    error = json.loads(missing.stderr.decode().splitlines()[-1])
    assert missing.returncode == 1 and error["code"] == "model_missing", missing.stderr.decode()
    assert "checkpoints/nowhere.safetensors (node load_checkpoint, CheckpointLoaderSimple.ckpt_name)" in \
        error["message"]
    assert "upscale_models/4x-Nothing.safetensors (node up, UpscaleModelLoader.model_name)" in error["message"]
    graph = own_graph()
    graph["face"] = {"class_type": "FaceDetailer", "inputs": {"image": ["decode", 0]}}
    custom = run_cli("run", str(write(tmp_path / "custom.json", graph)), "--json", env=env)
    error = json.loads(custom.stderr.decode().splitlines()[-1])
    assert custom.returncode == 2 and error["code"] == "unknown_node_class"
    assert "FaceDetailer (node face)" in error["message"]
    listed = run_cli("run", str(tmp_path / "custom.json"), "--list-params", env=env)
    assert listed.returncode == 2  # refused before listing too
    assert not (tmp_path / "home" / "state" / "workers").exists() or \
        not list((tmp_path / "home" / "state" / "workers").glob("*.json"))


def test_list_params_and_a_load_image_that_is_nowhere(tmp_path):
    wf = write(tmp_path / "i2i.json", own_graph(init_image="photo-from-my-comfyui.png", denoise=0.5))
    env = {"IMAGEGEN_HOME": str(tmp_path / "home")}
    listed = run_cli("run", str(wf), "--list-params", "--json", env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    records = {r["key"]: r for r in map(json.loads, listed.stdout.decode().splitlines())}
    assert records["image"]["type"] == "IMAGE_FILE" and records["denoise"]["value"] == 0.5
    assert records["sampler.steps"]["min"] == 1 and records["prompt"]["sets"] == ["positive.text"]
    result = run_cli("run", str(wf), "--json", env=env)
    error = json.loads(result.stderr.decode().splitlines()[-1])
    assert result.returncode == 2 and "node load_image (LoadImage) loads 'photo-from-my-comfyui.png'" in \
        error["message"] and "--set load_image.image=PATH" in error["hint"]
    bad = run_cli("run", str(wf), "--set", "steps=many", "--json", env=env)
    assert bad.returncode == 2 and "not a whole number" in bad.stderr.decode()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    corrupt = run_cli("run", str(wf), "--set", f"image={tmp_path / 'broken.png'}", "--json", env=env)
    error = json.loads(corrupt.stderr.decode().splitlines()[-1])
    assert corrupt.returncode == 2 and error["code"] == "invalid_source_image" and "is not an image" in \
        error["message"] and "--image" not in error["message"] + error["hint"]  # run has no --image option


def test_a_batch_workflow_items_paths_are_relative_to_the_prompts_file(tmp_path, monkeypatch):
    from PIL import Image

    from imagegen.engine import batch

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my.safetensors").write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(folder / "photo.png")
    write(folder / "i2i.json", own_graph(init_image="placeholder.png", denoise=0.5))
    (folder / "items.jsonl").write_text(json.dumps({"workflow": "i2i.json", "set": {
        "image": "photo.png", "checkpoint": "./my.safetensors"}}) + "\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with open(folder / "items.jsonl") as handle:
        items = batch.read_items(handle, "items.jsonl", folder)
    [job] = batch.plan(items, tmp_path / "out", {}, 1, 1)
    assert job.inputs == {"load_image.image": folder / "photo.png"}
    assert job.bundle.files["load_checkpoint.ckpt_name"].local_path == str(folder / "my.safetensors")


def test_several_images_for_stdout_are_refused_before_any_is_written(tmp_path, capsysbinary, monkeypatch):
    from types import SimpleNamespace

    from imagegen.engine import workflow_jobs

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "tiny-sd15.safetensors").write_bytes(b"x")
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", str(tmp_path / "models"))
    graph = own_graph()
    graph["save_again"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "x"}}
    workflow = workflow_run.load(write(tmp_path / "two.json", graph))
    with pytest.raises(ImagegenError) as caught:  # before any worker: the graph has two SaveImage nodes
        workflow_run.plan(workflow, {}, 1, "-", False, runtime=None)
    assert caught.value.exit_code == 2 and "-o DIR" in caught.value.hint
    assert workflow_run.plan(workflow, {}, 1, str(tmp_path / "a.png"), False, runtime=None)  # a file: -2.png beside
    (tmp_path / "a-2.png").write_bytes(b"mine")
    with pytest.raises(ImagegenError) as caught:  # the second image's name is taken: refused before any worker
        workflow_run.plan(workflow, {}, 1, str(tmp_path / "a.png"), False, runtime=None)
    assert caught.value.code == "output_exists" and "a-2.png exists already" in caught.value.message
    assert workflow_run.plan(workflow, {}, 1, str(tmp_path / "a.png"), True, runtime=None)  # --overwrite
    job = workflow_run.plan(workflow, {}, 1, str(tmp_path / "b.png"), False, runtime=None)[0]
    (tmp_path / "b-2.png").write_bytes(b"mine")  # taken while it rendered: still nothing is written
    two = [{"filename": f"{name}.png", "subfolder": "", "type": "output"} for name in ("a", "b")]
    with pytest.raises(ImagegenError):
        workflow_jobs.save_outputs(None, {"outputs": {"save": {"images": two}}}, job, None, False, {}, 0.0)
    assert not (tmp_path / "b.png").exists() and (tmp_path / "b-2.png").read_bytes() == b"mine"
    images = [{"filename": f"{name}.png", "subfolder": "", "type": "output"} for name in ("a", "b")]
    job = SimpleNamespace(workflow=SimpleNamespace(graph=own_graph()), targets=[None])  # a batch the graph hides
    with pytest.raises(ImagegenError):
        workflow_jobs.save_outputs(None, {"outputs": {"save": {"images": images}}}, job, None, False, {}, 0.0)
    assert capsysbinary.readouterr().out == b""


# --- real ComfyUI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(comfyui_dir, tiny_sd15, tiny_esrgan, tmp_path_factory):
    """One home and one warm worker for the module; the tiny models in a shared ComfyUI-style models tree."""
    home = tmp_path_factory.mktemp("run-home")
    tree = tmp_path_factory.mktemp("comfy-models")
    for folder, source in (("checkpoints", tiny_sd15), ("upscale_models", tiny_esrgan)):
        (tree / folder).mkdir()
        (tree / folder / source.name).symlink_to(source)
    values = {"IMAGEGEN_HOME": str(home), "IMAGEGEN_COMFYUI_DIR": str(comfyui_dir), "IMAGEGEN_RUNTIME": "local",
              "IMAGEGEN_KEEP_WARM": "300", "IMAGEGEN_SHARED_MODELS": str(tree)}
    yield values
    run_cli("stop", "--all", env=values)


def run_ok(*args, env, cwd=None) -> list[dict]:
    result = run_cli("run", *args, "--json", env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr.decode()
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


def same_graph(a: dict, b: dict) -> bool:
    """Two API graphs alike but for their ids and output prefixes (the UI chunk's ids are numbers)."""
    def shape(graph):
        order = {node_id: str(i) for i, node_id in enumerate(graph)}
        return [(n["class_type"], {k: [order[v[0]], v[1]] if isinstance(v, list) else v
                                   for k, v in n["inputs"].items() if k != "filename_prefix"}) for n in graph.values()]
    return shape(a) == shape(b)


@pytest.mark.comfyui
def test_api_and_ui_exports_of_the_projects_graph_run_alike_and_reopen(env, tmp_path, tiny_sd15):
    api = write(tmp_path / "api.json", own_graph())
    ui = write(tmp_path / "ui.json", ui_graph.from_api(own_graph()))
    [a] = run_ok(str(api), "--set", "prompt=a red fox", "--set", "seed=11", "-o", str(tmp_path / "a.png"), env=env)
    [b] = run_ok(str(ui), "--set", "positive.text=a red fox", "--set", "sampler.seed=11", "-o",
                 str(tmp_path / "b.png"), env=env)
    assert idat(tmp_path / "a.png") == idat(tmp_path / "b.png"), "the same graph in either format, the same pixels"
    assert a["seed"] == b["seed"] == 11 and a["prompt"] == "a red fox"
    found = chunks(tmp_path / "a.png")
    prompt = json.loads(found["prompt"])  # ComfyUI's own chunk: the graph as patched and run
    assert prompt["positive"]["inputs"]["text"] == "a red fox" and prompt["sampler"]["inputs"]["seed"] == 11
    assert same_graph(ui_graph.to_api(json.loads(found["workflow"])).graph, prompt)  # the UI chunk loads back
    record = json.loads(found["imagegen"])
    assert record["workflow"] == {"name": "api.json", "format": "api", "output_node": "save", "inputs": {},
                                  "sha256": hashlib.sha256(api.read_bytes()).hexdigest(),
                                  "set": {"prompt": "a red fox", "seed": "11"}}
    for result in (a, b):
        Draft202012Validator(RESULT).validate(result)
    assert record["files"]["load_checkpoint.ckpt_name"]["sha256"] == hashlib.sha256(tiny_sd15.read_bytes()).hexdigest()
    user_ui = json.loads(chunks(tmp_path / "b.png")["workflow"])  # the user's own UI graph, with the values set
    assert [n["widgets_values"] for n in user_ui["nodes"] if n["title"] == "positive"] == [["a red fox"]]
    [again] = run_ok("--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png"), env=env)
    assert again["seed"] == 11 and idat(tmp_path / "c.png") == idat(tmp_path / "a.png")
    made = run_cli("generate", "a red fox", "--checkpoint", str(tiny_sd15), "--size", "64x64", "--steps", "2",
                   "--seed", "11", "--sampler", "euler", "--scheduler", "normal", "--cfg", "7", "-o",
                   str(tmp_path / "generated.png"), env=env)
    assert made.returncode == 0, made.stderr.decode()
    own = chunks(tmp_path / "generated.png")  # imagegen's own graphs carry a UI workflow chunk too
    assert same_graph(ui_graph.to_api(json.loads(own["workflow"])).graph, json.loads(own["prompt"]))
    [rerun] = run_ok(str(tmp_path / "generated.png"), "-o", str(tmp_path / "d.png"), env=env)  # a PNG as workflow
    assert rerun["workflow"]["format"] == "png" and idat(tmp_path / "d.png") == idat(tmp_path / "generated.png")


@pytest.mark.comfyui
def test_the_editors_own_shape_with_title_id_and_count(env, tmp_path):
    records = run_ok(str(EDITOR), "--set", "Positive.text=a lighthouse", "--set", "3.steps=1", "-n", "2", "-o",
                     str(tmp_path) + "/", env=env)
    assert [r["seed"] for r in records] == [1234, 1235] and records[0]["prompt"] == "a lighthouse"
    assert idat(records[0]["path"]) != idat(records[1]["path"])
    saved = json.loads(chunks(records[1]["path"])["workflow"])  # the editor's graph, its primitive seed updated
    assert {n["id"]: n.get("widgets_values") for n in saved["nodes"]}[10] == [1235, "fixed"]
    assert any(n["type"] == "Note" for n in saved["nodes"])
    [rerun] = run_ok("--from", records[1]["path"], "-o", str(tmp_path / "again.png"), env=env)
    assert idat(tmp_path / "again.png") == idat(records[1]["path"])


@pytest.mark.comfyui
def test_img2img_upscale_and_lora_chains(env, tmp_path, tiny_sd15):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 60, 20)).save(tmp_path / "photo.png")
    i2i = write(tmp_path / "i2i.json", own_graph(init_image="placeholder.png", denoise=0.4))
    [image] = run_ok(str(i2i), "--set", "image=photo.png", "-o", str(tmp_path / "i2i.png"), env=env, cwd=tmp_path)
    assert image["denoise"] == 0.4
    assert image["workflow"]["inputs"]["load_image.image"]["path"] == str(tmp_path / "photo.png")
    [rerun] = run_ok("--from", str(tmp_path / "i2i.png"), "-o", str(tmp_path / "i2i-again.png"), env=env)
    assert idat(tmp_path / "i2i-again.png") == idat(tmp_path / "i2i.png")  # the input found again by its record
    i2i_ui = write(tmp_path / "i2i-ui.json", ui_graph.from_api(json.loads(i2i.read_text())))
    run_ok(str(i2i_ui), "--set", "image=photo.png", "-o", str(tmp_path / "i2i-ui.png"), env=env, cwd=tmp_path)
    assert idat(tmp_path / "i2i-ui.png") == idat(tmp_path / "i2i.png")  # the UI export of the chain runs alike
    upscale = write(tmp_path / "up.json", workflows.upscale("tiny-esrgan-x4.safetensors", "photo.png"))
    [big] = run_ok(str(upscale), "-o", str(tmp_path / "big.png"), env=env, cwd=tmp_path)  # found beside the file
    assert (big["width"], big["height"]) == (256, 256)
    lora = FIXTURES / "tiny-lora-for-run.safetensors"
    if not lora.is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "tiny_addons.py"), "lora", str(tiny_sd15), str(lora)],
                       check=True, capture_output=True)
    graph = own_graph()
    graph["lora"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["load_checkpoint", 0], "clip": ["load_checkpoint", 1], "lora_name": str(lora),
        "strength_model": 1.0, "strength_clip": 1.0}}
    graph["sampler"]["inputs"]["model"] = ["lora", 0]
    for node in ("positive", "negative"):
        graph[node]["inputs"]["clip"] = ["lora", 1]
    [with_lora] = run_ok(str(write(tmp_path / "lora.json", graph)), "-o", str(tmp_path / "lora.png"), env=env)
    [plain] = run_ok(str(write(tmp_path / "plain.json", own_graph())), "-o", str(tmp_path / "plain.png"), env=env)
    assert with_lora["files"]["lora.lora_name"]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert idat(tmp_path / "lora.png") != idat(tmp_path / "plain.png")


@pytest.mark.comfyui
def test_a_batch_sweep_over_a_workflow_resumes_after_ctrl_c(env, tmp_path):
    wf = write(tmp_path / "wf.json", own_graph())
    lines = "\n".join(json.dumps({"workflow": str(wf), "seed": seed, "prompt": f"sweep {seed}",
                                  "set": {"sampler.steps": 30}}) for seed in range(6)).encode()
    out = tmp_path / "out"
    args = [sys.executable, str(REPO / "generate_image.py"), "batch", "-o", str(out)]
    process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **env})
    process.stdin.write(lines)
    process.stdin.close()
    process.stdin = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "manifest.jsonl").exists() and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _stdout, stderr = communicate(process, 120)
    assert process.returncode == 130, stderr.decode()
    before = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert 1 <= len(before) < 6 and all(Path(line["path"]).is_file() for line in before)
    rerun = run_cli("batch", "-o", str(out), input=lines, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()
    after = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    done = {line["key"]: line for line in after if line["status"] == "done"}
    assert len(done) == 6 and len(rerun.stdout.decode().splitlines()) == 6 - len(before)
    assert sorted(line["seed"] for line in done.values()) == list(range(6))
    assert {line["workflow"]["sha256"] for line in done.values()} == {hashlib.sha256(wf.read_bytes()).hexdigest()}


@pytest.mark.comfyui
def test_a_batch_item_whose_workflow_saves_two_images_counts_both(env, tmp_path):
    graph = own_graph()
    graph["save_again"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "x"}}
    write(tmp_path / "two.json", graph)
    (tmp_path / "items.jsonl").write_text(json.dumps({"workflow": "two.json", "output": "pair"}) + "\n")
    result = run_cli("batch", str(tmp_path / "items.jsonl"), "-o", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert "2 done, 0 failed, 0 skipped (done earlier) of 2" in result.stderr.decode()
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(Path(line["path"]).name for line in lines) == ["pair-2.png", "pair.png"]


@pytest.mark.comfyui
def test_mcp_run_workflow_lists_params_and_runs(env, tmp_path):
    import anyio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    wf = write(tmp_path / "wf.json", own_graph())
    params = StdioServerParameters(command=sys.executable, args=[str(REPO / "generate_image.py"), "mcp"],
                                   env={**os.environ, **env}, cwd=str(tmp_path))

    async def main():
        async with stdio_client(params) as (read, write_stream), ClientSession(read, write_stream) as session:
            await session.initialize()
            with anyio.fail_after(300):
                listed = await session.call_tool("run_workflow", {"workflow": str(wf), "list_params": True})
                ran = await session.call_tool("run_workflow", {"workflow": str(wf), "set": {"seed": 3, "prompt": "mcp"},
                                                               "output_dir": str(tmp_path / "mcp")})
                bad = await session.call_tool("run_workflow", {"workflow": str(wf), "set": {"nope": 1}})
                relative = [await session.call_tool("run_workflow", arguments) for arguments in (
                    {"workflow": "wf.json"}, {"workflow": str(wf), "output_dir": "mcp"},
                    {"workflow": str(i2i), "set": {"image": "photo.png"}},  # the server's folder is not the agent's
                    {"workflow": str(i2i), "set": {"image": "photo.png"}, "list_params": True})]
                return listed, ran, bad, relative

    i2i = write(tmp_path / "i2i.json", own_graph(init_image="placeholder.png", denoise=0.5))
    (tmp_path / "photo.png").write_bytes(b"")
    listed, ran, bad, relative = anyio.run(main)
    for refused in relative:
        error = json.loads(refused.content[0].text)
        assert refused.is_error and error["code"] == "invalid_argument" and "absolute path" in error["message"], error
    assert "prompt" in {record["key"] for record in listed.structured_content["params"]}
    [record] = ran.structured_content["results"]
    assert not ran.is_error and record["seed"] == 3 and Path(record["path"]).parent == tmp_path / "mcp"
    assert bad.is_error and json.loads(bad.content[0].text)["code"] == "invalid_argument"


@pytest.mark.comfyui
def test_a_remote_worker_is_checked_against_its_own_node_definitions_and_files(env, tmp_path):
    run_ok(str(write(tmp_path / "warm.json", own_graph())), "-o", str(tmp_path / "warm.png"), env=env)  # it runs
    workers_dir = Path(env["IMAGEGEN_HOME"]) / "state" / "workers"
    port = json.loads((workers_dir / "local-cpu.json").read_text())["port"]
    token = (workers_dir / "local-cpu.token").read_text().strip()
    remote = {**env, "IMAGEGEN_RUNTIME": "remote", "IMAGEGEN_REMOTE_WORKERS": f"http://127.0.0.1:{port}#{token}",
              "IMAGEGEN_HOME": str(tmp_path / "elsewhere"), "IMAGEGEN_SHARED_MODELS": ""}
    wf = write(tmp_path / "wf.json", own_graph())
    listed = run_cli("run", str(wf), "--list-params", "--json", env=remote)
    assert listed.returncode == 0, listed.stderr.decode()
    records = {r["key"]: r for r in map(json.loads, listed.stdout.decode().splitlines())}
    assert "tiny-sd15.safetensors" in records["load_checkpoint.ckpt_name"]["choices"]  # the worker's own files
    [image] = run_ok(str(wf), "--set", "seed=2", "-o", str(tmp_path / "remote.png"), env=remote)
    assert image["seed"] == 2 and (tmp_path / "remote.png").is_file()
    missing = run_cli("run", str(wf), "--set", "checkpoint=not-on-that-worker.safetensors", "--json", env=remote)
    error = json.loads(missing.stderr.decode().splitlines()[-1])
    assert missing.returncode == 2 and "not one of KSampler" not in error["message"]
    assert "not-on-that-worker.safetensors" in error["message"] and "choices" in error["message"]
