import math

import pytest

from imagegen.engine import generate
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError


@pytest.mark.parametrize("size, fragment", [("512", "not WIDTHxHEIGHT"), ("513x512", "multiple of 8"),
                                            ("8x512", "outside"), ("99999x512", "outside"),
                                            ("axb", "not WIDTHxHEIGHT")])
def test_bad_sizes(size, fragment):
    with pytest.raises(ImagegenError) as caught:
        generate.parse_size(size)
    assert caught.value.code == "invalid_size" and fragment in caught.value.message


def test_sizes_accept_x_and_spaces():
    assert generate.parse_size("768x512") == (768, 512) and generate.parse_size(" 64 X 96 ") == (64, 96)


@pytest.mark.parametrize("prompt, fragment",
                         [("", "empty"), ("   ", "empty"), ("a\x00b", "control"), ("x" * 10001, "limit")])
def test_bad_prompts(prompt, fragment):
    with pytest.raises(ImagegenError) as caught:
        generate.check_prompt(prompt)
    assert caught.value.code == "invalid_prompt" and fragment in caught.value.message


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", 10001), ("cfg", math.nan), ("cfg", -1.0),
                                          ("count", 0), ("seed", -1), ("sampler", "no pe"), ("scheduler", "No-Pe")])
def test_out_of_range_parameters(field, value):
    request = generate.Request(prompt="a fox", **{field: value})
    with pytest.raises(ImagegenError) as caught:
        generate.plan_jobs(request, Registry.load().get("sd15"))
    assert caught.value.code == "invalid_argument" and field in caught.value.message


def test_jobs_take_model_defaults_and_consecutive_seeds():
    jobs = generate.plan_jobs(generate.Request(prompt="a fox", seed=10, count=3), Registry.load().get("flux-schnell"))
    assert [j.seed for j in jobs] == [10, 11, 12]
    assert (jobs[0].width, jobs[0].steps, jobs[0].cfg, jobs[0].scheduler) == (1024, 4, 1.0, "simple")
    assert len({j.filename_prefix for j in jobs}) == 3


def test_fast_mode_needs_a_compiler_where_a_local_worker_compiles(monkeypatch):
    import shutil
    from types import SimpleNamespace

    local, docker = SimpleNamespace(compiles_on_host=True), SimpleNamespace(compiles_on_host=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("IMAGEGEN_FAST_ON_CPU", "1")  # this machine has no GPU: make its CPU worker compile
    with pytest.raises(ImagegenError) as caught:
        generate.check_fast_toolchain(local, fast=True)
    assert caught.value.code == "fast_unavailable" and caught.value.exit_code == 2
    assert "C compiler" in caught.value.message and "apt install build-essential" in caught.value.hint
    generate.check_fast_toolchain(local, fast=False)
    generate.check_fast_toolchain(docker, fast=True)  # the image brings its own compiler
    monkeypatch.delenv("IMAGEGEN_FAST_ON_CPU")
    generate.check_fast_toolchain(local, fast=True)   # a CPU worker runs fast jobs plain: nothing to compile
