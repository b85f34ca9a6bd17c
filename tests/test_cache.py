"""The model cache's search by name: LoRA/ControlNet files found in the cache's own folders and in ComfyUI- and
A1111-layout shared trees, with subfolders, symlinks, our link folder left out, and every name listed for
did-you-mean. Real files in tmp folders."""

import os

from safetensors_util import write_safetensors

from imagegen.models import cache
from imagegen.util import paths


def _file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(path, {})


def test_a_name_is_found_in_the_cache_and_in_comfyui_and_a1111_trees(tmp_path, monkeypatch):
    own = _file(paths.models_dir() / "loras" / "watercolor.safetensors")
    comfy, a1111 = tmp_path / "ComfyUI" / "models", tmp_path / "webui" / "models"
    ink = _file(comfy / "loras" / "styles" / "ink.safetensors")
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    pixel = _file(a1111 / "Lora" / "pixel art.safetensors")
    canny = _file(a1111 / "ControlNet" / "canny.safetensors")
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", os.pathsep.join([str(comfy), str(a1111)]))

    assert cache.model_folders("loras") == [paths.models_dir() / "loras", comfy / "loras", a1111 / "Lora"]
    assert cache.find_by_name("watercolor", "loras").matches == [own]
    assert cache.find_by_name("watercolor.safetensors", "loras").matches == [own]
    assert cache.find_by_name("styles/ink", "loras").matches == [ink]
    assert cache.find_by_name("ink", "loras").matches == [ink]  # the one file of that name, in a subfolder
    assert cache.find_by_name("pixel art", "loras").matches == [pixel]
    assert cache.find_by_name("canny", "controlnet").matches == [canny]
    assert cache.find_by_name("canny", "loras").matches == []  # a ControlNet is no LoRA
    missing = cache.find_by_name("watercolr", "loras")
    assert missing.matches == [] and missing.names == ["pixel art", "styles/ink", "watercolor"]


def test_two_files_of_one_name_are_both_found_and_a_top_level_one_wins(tmp_path, monkeypatch):
    tree = tmp_path / "models"
    first = _file(tree / "loras" / "old" / "ink.safetensors")
    second = _file(tree / "loras" / "new" / "ink.safetensors")
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", str(tree))
    assert sorted(cache.find_by_name("ink", "loras").matches) == sorted([first, second])
    assert cache.find_by_name("new/ink", "loras").matches == [second]
    top = _file(tree / "loras" / "ink.safetensors")
    assert cache.find_by_name("ink", "loras").matches == [top]
    same_in_cache = _file(paths.models_dir() / "loras" / "ink.safetensors")
    assert cache.find_by_name("ink", "loras").matches == [same_in_cache, top]


def test_links_and_our_own_link_folder(tmp_path, monkeypatch):
    tree = tmp_path / "models"
    real = _file(tmp_path / "elsewhere" / "styles" / "ink.safetensors")
    (tree / "loras").mkdir(parents=True)
    (tree / "loras" / "linked").symlink_to(real.parent, target_is_directory=True)  # a symlinked folder is followed
    (tree / "loras" / "ink.safetensors").symlink_to(real)   # the same file twice counts once
    monkeypatch.setenv("IMAGEGEN_SHARED_MODELS", str(tree))
    assert cache.find_by_name("linked/ink", "loras").matches == [tree / "loras" / "linked" / "ink.safetensors"]
    assert len(cache.find_by_name("ink", "loras").matches) == 1
    _file(paths.models_dir() / "loras" / "imagegen-local" / "1234abcd-hidden.safetensors")
    assert cache.find_by_name("1234abcd-hidden", "loras").matches == []
    assert cache.find_by_name("imagegen-local/1234abcd-hidden", "loras").matches == []
    assert "imagegen-local/1234abcd-hidden" not in cache.find_by_name("nothing", "loras").names
    assert cache.find_by_name("../elsewhere/styles/ink", "loras").matches == []  # names stay inside the folders
