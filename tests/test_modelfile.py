import json
import os
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
    return write_safetensors(path, {"shared.weight": ("F8_E4M3", [2, width]),
                                    "encoder.block.0.layer.0.SelfAttention.q.weight": ("F8_E4M3", [2, 2])})


def clip_l(path, width=768):
    return write_safetensors(path, {"text_model.embeddings.token_embedding.weight": ("F16", [2, width])})


def flux_vae(path, channels=16):
    return write_safetensors(path, {"decoder.conv_in.weight": ("F16", [2, channels, 1, 1]),
                                    "encoder.down.0.block.0.conv1.weight": ("F16", [1])})


def test_detects_families_from_names_and_shapes(tmp_path):
    assert modelfile.detect(modelfile.read_header(flux_model(tmp_path / "f.safetensors"))).family == "flux"
    assert modelfile.detect(modelfile.read_header(t5(tmp_path / "t.safetensors"))).details["d_model"] == 4096
    assert modelfile.detect(modelfile.read_header(clip_l(tmp_path / "c.safetensors"))).family == "clip_l"
    vae = modelfile.detect(modelfile.read_header(flux_vae(tmp_path / "v.safetensors")))
    assert vae.details["latent_channels"] == 16
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
    files = {"diffusion_model": flux_model(tmp_path / "m.safetensors"),
             "t5": t5(tmp_path / "t5-base.safetensors", width=768),
             "clip_l": clip_l(tmp_path / "c.safetensors"), "vae": flux_vae(tmp_path / "v.safetensors")}
    resolve = {bundle.files[role].key: path for role, path in files.items()}
    with pytest.raises(ImagegenError) as caught:
        modelfile.check_bundle_files(bundle, lambda f: resolve[f.key])
    assert caught.value.code == "incompatible_bundle"
    assert "4096-wide" in caught.value.message and "768" in caught.value.message
    files["t5"] = t5(tmp_path / "t5-xxl.safetensors")
    resolve = {bundle.files[role].key: path for role, path in files.items()}
    modelfile.check_bundle_files(bundle, lambda f: resolve[f.key])  # the right encoder passes


UNET_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def _tensor(dtype="F16", shape=(2, 2), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def _craft(path, header, data: int = 8, length: int | None = None):
    """A .safetensors file with exactly this header (a dict, or raw bytes) and `data` zero bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(data))
    return path


CRAFTED = {  # name: (header, data bytes, length override, what the message must say)
    "shape-null": ({"w": _tensor(shape=None)}, 8, None, "'w' has shape None"),
    "shape-string": ({"w": _tensor(shape="2x2")}, 8, None, "'w' has shape '2x2'"),
    "shape-bool": ({"w": _tensor(shape=[True, 8])}, 8, None, "not a list of non-negative integers"),
    "shape-negative": ({"w": _tensor(shape=[-2, -2])}, 8, None, "not a list of non-negative integers"),
    "shape-float": ({"w": _tensor(shape=[2.0, 2])}, 8, None, "not a list of non-negative integers"),
    "dtype-list": ({"w": _tensor(dtype=["F16"])}, 8, None, "has dtype ['F16']"),
    "dtype-null": ({"w": _tensor(dtype=None)}, 8, None, "has dtype None"),
    "entry-number": ({"w": 7}, 8, None, "'w' is a JSON int"),
    "entry-missing-offsets": ({"w": {"dtype": "F16", "shape": [2, 2]}}, 8, None, "'w' has no data_offsets"),
    "offsets-strings": ({"w": _tensor(offsets=["0", "8"])}, 8, None, "not a [start, end] pair"),
    "offsets-three": ({"w": _tensor(offsets=[0, 4, 8])}, 8, None, "not a [start, end] pair"),
    "offsets-null": ({"w": _tensor(offsets=None)}, 8, None, "not a [start, end] pair"),
    "offsets-reversed": ({"w": _tensor(shape=[0], offsets=[8, 0])}, 8, None, "outside the file"),
    "offsets-past-end": ({"w": _tensor(offsets=[0, 8])}, 4, None, "outside the file"),
    "offsets-negative": ({"w": _tensor(shape=[0], offsets=[-8, -8])}, 8, None, "outside the file"),
    "offsets-overlap": ({"a": _tensor(offsets=[0, 8]), "b": _tensor(offsets=[4, 12])}, 12, None, "overlap"),
    "header-list": ([{"w": _tensor()}], 8, None, "JSON list, not an object"),
    "header-string": ("weights", 8, None, "JSON str, not an object"),
    "header-null": (b"null", 8, None, "JSON NoneType, not an object"),
    "header-deeply-nested": (b"[" * 100_000 + b"]" * 100_000, 8, None, "not valid JSON"),
    "header-not-utf8": (b'{"\xff": 1}', 8, None, "not valid JSON"),
    "metadata-list": ({"__metadata__": ["x"], "w": _tensor()}, 8, None, "__metadata__"),
    "length-past-file": ({"w": _tensor()}, 8, 10_000, "out of bounds"),
    "length-huge": ({"w": _tensor()}, 8, 2**63, "out of bounds"),
    "length-zero": ({"w": _tensor()}, 8, 0, "out of bounds"),
    "unet-1d-to-k": ({UNET_K: _tensor(shape=[4])}, 8, None, "a 2-D weight is expected"),
    "flux-1d-txt-in": ({"double_blocks.0.x": _tensor(shape=[4]), "txt_in.weight": _tensor(shape=[4], offsets=[8, 16])},
                       16, None, "'txt_in.weight' has shape [4]"),
    "clip-1d-embedding": ({"text_model.embeddings.token_embedding.weight": _tensor(shape=[4])}, 8, None,
                          "2-D weight is expected"),
    "t5-1d-shared": ({"shared.weight": _tensor(shape=[4]), "encoder.block.0.x": _tensor(shape=[4], offsets=[8, 16])},
                     16, None, "'shared.weight' has shape [4]"),
    "vae-2d-conv-in": ({"decoder.up.0.x": _tensor(shape=[4]), "decoder.conv_in.weight": _tensor(offsets=[8, 16])},
                       16, None, "a 4-D weight is expected"),
}


def _error(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.decode().strip().splitlines()
    assert "Traceback" not in result.stderr.decode()
    return json.loads(lines[-1])


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_are_invalid_model_file_through_the_cli(tmp_path, case):
    """Valid JSON with wrong types, ranks or offsets used to crash inspect/add with internal_error."""
    from conftest import run_cli

    header, data, length, fragment = CRAFTED[case]
    crafted = _craft(tmp_path / f"{case}.safetensors", header, data, length)
    inspected = _error(run_cli("models", "inspect", str(crafted), "--json", timeout=120))
    assert inspected["code"] == "invalid_model_file" and fragment in inspected["message"], inspected
    assert inspected["hint"]
    added = _error(run_cli("models", "add", "crafted", "--file", str(crafted), "--json", timeout=120))
    assert added["code"] == "invalid_model_file" and fragment in added["message"], added
    assert not (tmp_path / "imagegen-home" / "models.yaml").exists()


@pytest.mark.parametrize("case", ["shape-null", "unet-1d-to-k", "offsets-overlap", "header-list"])
def test_crafted_checkpoint_is_refused_before_generate_starts(tmp_path, case):
    from conftest import run_cli

    header, data, length, fragment = CRAFTED[case]
    crafted = _craft(tmp_path / f"{case}.safetensors", header, data, length)
    result = run_cli("generate", "a cat", "--checkpoint", str(crafted), "-o", str(tmp_path / "out.png"), "--json",
                     timeout=120)
    error = _error(result)
    assert error["code"] == "invalid_model_file" and fragment in error["message"], error
    assert not (tmp_path / "imagegen-home" / "state" / "workers").exists()
    plain = run_cli("generate", "a cat", "--checkpoint", str(crafted), timeout=120)
    assert plain.returncode == 2 and b"error:" in plain.stderr and b"hint:" in plain.stderr


def test_every_crafted_header_is_refused_in_process(tmp_path):
    for case, (header, data, length, fragment) in CRAFTED.items():
        crafted = _craft(tmp_path / f"{case}.safetensors", header, data, length)
        with pytest.raises(ImagegenError) as caught:
            modelfile.detect(modelfile.read_header(crafted))
        assert caught.value.code == "invalid_model_file" and fragment in caught.value.message, case


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ImagegenError, match="not a regular file"):
        modelfile.read_header(fifo)
