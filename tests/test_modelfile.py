import json
import struct

import pytest
from safetensors_util import write_safetensors

from imagegen.models import modelfile
from imagegen.models.registry import Registry
from imagegen.util.errors import ImagegenError


def flux_model(path, context=4096):
    return write_safetensors(path, {"img_in.weight": ("BF16", [3072, 2]), "txt_in.weight": ("BF16", [2, context]),
                                    "double_blocks.0.img_attn.norm.key_norm.scale": ("BF16", [128]),
                                    "guidance_in.in_layer.weight": ("BF16", [2, 2])})


def t5(path, width=4096):
    return write_safetensors(path, {"shared.weight": ("F8_E4M3", [2, width]), "encoder.block.0.layer.0.SelfAttention.q.weight": ("F8_E4M3", [2, 2])})


def clip_l(path, width=768):
    return write_safetensors(path, {"text_model.embeddings.token_embedding.weight": ("F16", [2, width])})


def flux_vae(path, channels=16):
    return write_safetensors(path, {"decoder.conv_in.weight": ("F16", [2, channels, 1, 1]), "encoder.down.0.block.0.conv1.weight": ("F16", [1])})


def test_detects_families_from_names_and_shapes(tmp_path):
    assert modelfile.detect(modelfile.read_header(flux_model(tmp_path / "f.safetensors"))).family == "flux"
    assert modelfile.detect(modelfile.read_header(t5(tmp_path / "t.safetensors"))).details["d_model"] == 4096
    assert modelfile.detect(modelfile.read_header(clip_l(tmp_path / "c.safetensors"))).family == "clip_l"
    assert modelfile.detect(modelfile.read_header(flux_vae(tmp_path / "v.safetensors"))).details["latent_channels"] == 16
    sdxl = write_safetensors(tmp_path / "x.safetensors", {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [640, 2048]),
        "model.diffusion_model.label_emb.0.0.weight": ("F16", [2, 2])})
    assert modelfile.detect(modelfile.read_header(sdxl)).family == "sdxl"


@pytest.mark.parametrize("mutate, fragment", [
    (lambda raw: raw[:5], "too short"),
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "out of bounds"),
    (lambda raw: struct.pack("<Q", 4) + b"{{{{" + raw[12:], "not valid JSON"),
    (lambda raw: raw[:-10], "outside the file"),
])
def test_refuses_broken_files(tmp_path, mutate, fragment):
    good = t5(tmp_path / "t.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mutate(good.read_bytes()))
    with pytest.raises(ImagegenError) as caught:
        modelfile.read_header(bad)
    assert caught.value.code == "invalid_model_file" and fragment in caught.value.message


def test_refuses_pickle_formats_and_shape_byte_mismatch(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04")
    with pytest.raises(ImagegenError, match="only .safetensors"):
        modelfile.read_header(ckpt)
    raw = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(ImagegenError, match="does not match"):
        modelfile.read_header(lying)


def test_flux_bundle_with_the_wrong_text_encoder_is_refused_before_loading(tmp_path):
    bundle = Registry.load().get("flux-dev")
    files = {"diffusion_model": flux_model(tmp_path / "m.safetensors"), "t5": t5(tmp_path / "t5-base.safetensors", width=768),
             "clip_l": clip_l(tmp_path / "c.safetensors"), "vae": flux_vae(tmp_path / "v.safetensors")}
    resolve = {bundle.files[role].key: path for role, path in files.items()}
    with pytest.raises(ImagegenError) as caught:
        modelfile.check_bundle_files(bundle, lambda f: resolve[f.key])
    assert caught.value.code == "incompatible_bundle"
    assert "4096-wide" in caught.value.message and "768" in caught.value.message
    files["t5"] = t5(tmp_path / "t5-xxl.safetensors")
    resolve = {bundle.files[role].key: path for role, path in files.items()}
    modelfile.check_bundle_files(bundle, lambda f: resolve[f.key])  # the right encoder passes
