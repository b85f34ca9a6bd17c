from test_output import PNG_1x1

from imagegen.comfy import png, provenance


def test_a1111_parameters_are_parsed_back():
    text = ("a castle on a hill\nat dawn\nNegative prompt: blurry, low quality\n"
            "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 768x512, Model hash: abc, "
            "Model: sd15")
    found = provenance.parse_a1111(text)
    assert found == {"prompt": "a castle on a hill\nat dawn", "negative": "blurry, low quality", "steps": 28,
                     "sampler": "dpmpp_2m", "scheduler": "karras", "cfg": 6.5, "seed": 1234, "width": 768,
                     "height": 512, "model": "sd15"}


def test_our_own_parameters_text_round_trips():
    record = {"prompt": "a fox", "negative": "", "steps": 20, "sampler": "euler_ancestral", "scheduler": "normal",
              "cfg": 7.0, "seed": 42, "width": 512, "height": 768, "model": "sd15", "family": "sd15",
              "imagegen_version": "0.1.0"}
    found = provenance.parse_a1111(png.a1111_parameters(record))
    keys = ("prompt", "steps", "sampler", "scheduler", "cfg", "seed", "width", "height", "model")
    assert {k: found[k] for k in keys} == {k: record[k] for k in keys}


def test_plain_comfyui_graph_is_read(tmp_path):
    graph = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamshaper.safetensors"}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red barn", "clip": ["4", 1]}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["4", 1]}},
             "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 640, "height": 448, "batch_size": 1}},
             "3": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 12, "cfg": 5.0, "sampler_name": "euler",
                                                        "scheduler": "karras", "positive": ["6", 0],
                                                        "negative": ["7", 0]}}}
    image = tmp_path / "comfy.png"
    import json

    image.write_bytes(png.add_text_chunks(PNG_1x1, {"prompt": json.dumps(graph)}))
    found = provenance.read_parameters(image)
    assert found == {"prompt": "a red barn", "negative": "ugly", "seed": 9, "steps": 12, "cfg": 5.0, "sampler": "euler",
                     "scheduler": "karras", "width": 640, "height": 448, "model_file": "dreamshaper.safetensors"}


def test_an_image_without_parameters_is_refused(tmp_path):
    import pytest

    from imagegen.util.errors import ImagegenError

    bare = tmp_path / "bare.png"
    bare.write_bytes(PNG_1x1)
    with pytest.raises(ImagegenError) as caught:
        provenance.read_parameters(bare)
    assert caught.value.code == "invalid_source_image"
