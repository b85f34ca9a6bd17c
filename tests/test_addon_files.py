"""LoRA and ControlNet base families told from crafted safetensors headers (names and shapes, zero data)."""

import pytest
from safetensors_util import write_safetensors

from imagegen.models import addon_files, modelfile


def detect(tmp_path, tensors, kind="lora"):
    header = modelfile.read_header(write_safetensors(tmp_path / f"{kind}.safetensors", tensors))
    return addon_files.detect_lora(header) if kind == "lora" else addon_files.detect_controlnet(header)


def pair(name, in_dim, out_dim, down=".lora_down.weight", up=".lora_up.weight"):
    return {name + down: ("F16", [4, in_dim]), name + up: ("F16", [out_dim, 4])}


LORAS = {
    "kohya-sd15": ({**pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320),
                    **pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)}, "sd15", "kohya"),
    "kohya-sd15-text-only": (pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768), "sd15",
                             "kohya"),
    "kohya-sdxl": ({**pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640),
                    **pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
                    **pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)}, "sdxl", "kohya"),
    "kohya-sdxl-unet-only": (pair("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q", 1280, 1280),
                             "sdxl", "kohya"),
    "peft-sd15": (pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 768, 320,
                       ".lora_A.weight", ".lora_B.weight"), "sd15", "peft"),
    "peft-sdxl": ({**pair("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640,
                          ".lora_A.weight", ".lora_B.weight"),
                   **pair("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280,
                          ".lora_A.weight", ".lora_B.weight")}, "sdxl", "peft"),
    "diffusers-old-sd15": (pair("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
                                768, 320, ".down.weight", ".up.weight"), "sd15", "peft"),
    "flux-diffusers": (pair("transformer.transformer_blocks.0.attn.to_q", 3072, 3072, ".lora_A.weight",
                            ".lora_B.weight"), "flux", "diffusers"),
    "flux-single-diffusers": (pair("transformer.single_transformer_blocks.0.proj_out", 15360, 3072,
                                   ".lora_A.weight", ".lora_B.weight"), "flux", "diffusers"),
    "flux-kohya": (pair("lora_unet_double_blocks_0_img_attn_qkv", 3072, 9216), "flux", "kohya"),
    "flux-xlabs": (pair("double_blocks.0.processor.proj_lora1", 3072, 3072, ".down.weight", ".up.weight"),
                   "flux", "xlabs"),
    "flux-comfy": (pair("diffusion_model.single_blocks.0.linear1", 3072, 21504, ".lora_A.weight", ".lora_B.weight"),
                   "flux", "comfy"),
    "sd2-kohya": (pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 1024, 320),
                  "sd2", "kohya"),
}


@pytest.mark.parametrize("name", sorted(LORAS))
def test_lora_layouts_and_families(tmp_path, name):
    tensors, family, layout = LORAS[name]
    found = detect(tmp_path, tensors)
    assert (found.kind, found.family, found.layout) == ("lora", family, layout)


def test_a_header_of_no_known_lora_layout_has_no_family(tmp_path):
    found = detect(tmp_path, {"some.other.weight": ("F16", [2, 2])})
    assert (found.kind, found.family) == ("unknown", None)
    assert detect(tmp_path, {}).family is None


CONTROLNETS = {
    "ldm-sd15": ({"control_model.input_hint_block.0.weight": ("F16", [16, 3, 3, 3]),
                  "control_model.zero_convs.0.0.weight": ("F16", [320, 320, 1, 1]),
                  "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768])},
                 "sd15", "ldm"),
    "ldm-sd15-no-prefix": ({"input_hint_block.0.weight": ("F16", [16, 3, 3, 3]),
                            "zero_convs.0.0.weight": ("F16", [320, 320, 1, 1]),
                            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768])},
                           "sd15", "ldm"),
    "diffusers-sdxl": ({"controlnet_cond_embedding.conv_in.weight": ("F16", [16, 3, 3, 3]),
                        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": ("F16", [640, 2048])},
                       "sdxl", "diffusers"),
    "diffusers-sdxl-small": ({"controlnet_cond_embedding.conv_in.weight": ("F16", [16, 3, 3, 3]),
                              "add_embedding.linear_1.weight": ("F16", [1280, 2816])}, "sdxl", "diffusers"),
    "diffusers-sd15": ({"controlnet_cond_embedding.conv_in.weight": ("F16", [16, 3, 3, 3]),
                        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": ("F16", [320, 768])},
                       "sd15", "diffusers"),
    "flux-instantx": ({"controlnet_x_embedder.weight": ("BF16", [3072, 64]),
                       "transformer_blocks.0.attn.to_q.weight": ("BF16", [3072, 3072]),
                       "controlnet_blocks.0.weight": ("BF16", [3072, 3072])}, "flux", "instantx"),
    "flux-xlabs": ({"controlnet_blocks.0.weight": ("BF16", [3072, 3072]),
                    "double_blocks.0.img_attn.norm.key_norm.scale": ("BF16", [128])}, "flux", "xlabs"),
}


@pytest.mark.parametrize("name", sorted(CONTROLNETS))
def test_controlnet_layouts_and_families(tmp_path, name):
    tensors, family, layout = CONTROLNETS[name]
    found = detect(tmp_path, tensors, "controlnet")
    assert (found.kind, found.family, found.layout) == ("controlnet", family, layout)


def test_a_lora_is_no_controlnet_and_back(tmp_path):
    assert detect(tmp_path, LORAS["kohya-sd15"][0], "controlnet").kind == "unknown"
    assert detect(tmp_path, CONTROLNETS["ldm-sd15"][0]).kind == "unknown"


def test_family_names_read_well():
    assert addon_files.family_name("sd15") == "SD1.5"
    assert addon_files.family_name("sdxl") == "SDXL"
    assert addon_files.family_name(None) == "an unknown family"
