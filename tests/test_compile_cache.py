"""The compile cache holds code the worker loads: it is created 0700, and one that others can
write to (or that someone else owns) is not used; a private folder is, and the log says why."""

from __future__ import annotations

import json
import os
import stat

from imagegen.worker.compile_cache import COMPILE_CACHE, compile_cache_env


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_compile_cache_is_private(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    env = compile_cache_env(models, fallback=tmp_path / "fallback")
    root = models / COMPILE_CACHE
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"), "TRITON_CACHE_DIR": str(root / "triton")}
    assert mode(root) == 0o700 and os.lstat(root).st_uid == os.getuid()
    assert capsys.readouterr().out == ""


def test_an_old_0755_cache_of_ours_is_made_private(tmp_path):
    models = tmp_path / "models"
    (models / COMPILE_CACHE).mkdir(parents=True)
    (models / COMPILE_CACHE).chmod(0o755)
    env = compile_cache_env(models, fallback=tmp_path / "fallback")
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(models / COMPILE_CACHE))
    assert mode(models / COMPILE_CACHE) == 0o700


def test_a_world_writable_cache_is_refused_for_a_private_folder(tmp_path, capsys):
    models = tmp_path / "models"
    (models / COMPILE_CACHE).mkdir(parents=True)
    (models / COMPILE_CACHE).chmod(0o777)
    fallback = tmp_path / "fallback"
    env = compile_cache_env(models, fallback=fallback)
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(fallback / "inductor"), "TRITON_CACHE_DIR": str(fallback / "triton")}
    assert mode(fallback) == 0o700
    event = json.loads(capsys.readouterr().out)
    assert event["event"] == "compile_cache_refused" and "writable by others" in event["why"]
    assert mode(models / COMPILE_CACHE) == 0o777, "a folder that is not safe is left as it is"


def test_a_symlinked_cache_is_refused(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (models / COMPILE_CACHE).symlink_to(elsewhere)
    env = compile_cache_env(models, fallback=tmp_path / "fallback")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "fallback" / "inductor")
    assert "not a folder" in json.loads(capsys.readouterr().out)["why"]


def test_a_read_only_model_cache_uses_the_private_folder_quietly(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o555)
    try:
        env = compile_cache_env(models, fallback=tmp_path / "fallback")
    finally:
        models.chmod(0o755)
    if os.getuid() != 0:  # root may write anywhere
        assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "fallback" / "inductor")
        assert capsys.readouterr().out == ""
