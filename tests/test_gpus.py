"""`--gpus`: indices are GPU indices (`0` is the first GPU, never the CPU); `cpu` is the CPU."""

from __future__ import annotations

import pytest

from imagegen.util.errors import ImagegenError
from imagegen.util.gpus import Gpu, select

GPUS = [Gpu(0, "GPU-aaaa-0000", "A", 24576, 20000), Gpu(1, "GPU-bbbb-1111", "B", 16384, 16000),
        Gpu(2, "GPU-cccc-2222", "C", 8192, 8000)]


@pytest.mark.parametrize("choice, indices", [
    (None, [0, 1, 2]), ("all", [0, 1, 2]), ("0", [0]), ("1", [1]), ("2", [2]), ("0,2", [0, 2]), ("2,0", [2, 0]),
    ("device=1", [1]), ("GPU-bbbb", [1]), ("GPU-cccc-2222,0", [2, 0]), ("1,1", [1]), ("cpu", []), ("none", []),
    ("CPU", []),
])
def test_choices_are_gpu_indices_uuids_all_or_cpu(choice, indices):
    assert [g.index for g in select(GPUS, choice)] == indices


@pytest.mark.parametrize("choice, fragment", [("3", "no GPU '3'"), ("0,5", "no GPU '5'"),
                                              ("GPU-zzzz", "no GPU 'GPU-zzzz'"), ("cpu,0", "cannot be combined"),
                                              (",", "name GPUs")])
def test_unknown_indices_are_usage_errors_that_name_the_gpus(choice, fragment):
    with pytest.raises(ImagegenError) as caught:
        select(GPUS, choice)
    assert caught.value.code == "invalid_argument" and caught.value.exit_code == 2
    assert fragment in caught.value.message and "GPU-aaaa-0000" in caught.value.message
    assert "--gpus cpu" in caught.value.hint


def test_on_a_machine_without_gpus_an_index_says_to_use_cpu():
    assert select([], None) == [] and select([], "cpu") == []
    with pytest.raises(ImagegenError) as caught:
        select([], "0")
    assert caught.value.code == "invalid_argument" and "GPUs: none" in caught.value.message
    assert "--gpus cpu" in caught.value.hint
