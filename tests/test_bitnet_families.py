"""BitNet for both families against code nobody here wrote: onebitllms' ``quantize_to_1bit`` and
``convert_to_bf16`` arithmetic (written out below from its source), transformers' ``pack_weights``, its
BitNet quantizer's choice of modules and its ``BitLinear`` / ``AutoBitLinear`` forward; and the Llama
(GPT-style) paths HF packed <-> plain <-> Megatron (TP=2, resharded) bit for bit."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bitnet import act_fake_quant, eager_transformers  # noqa: F401  (an autouse fixture)
from test_roundtrip import assert_bit_exact, load_hf
from transformers import FalconH1ForCausalLM, LlamaForCausalLM
from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights, replace_with_bitnet_linear
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.utils import logging as hf_logging

from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.engine.reshard import reshard
from bridge.errors import UnsupportedError
from bridge.families import FAMILIES, family_of
from bridge.features.bitnet import pack_checkpoint, unpack_checkpoint
from bridge.formats.legacy import LegacyCheckpoint
from bridge.tiny import make_tiny, preset_config

FALCON_PRESETS = ("tiny", "tiny-bias-tied")
LLAMA_PRESETS = ("llama-tiny", "llama-tiny-tied", "llama-tiny-bias")
LINEAR_CLASSES = ("bitlinear", "autobitlinear")


# --- onebitllms, written out from its source ----------------------------------------------------------
# tiiuae/onebitllms, commit 66f212b (2026-04-16), src/onebitllms/utils/quantization_utils.py:
# ``quantize_to_1bit`` loads the model with torch_dtype=bfloat16, then for every state-dict entry whose
# name contains none of the strings of ``_is_param_to_not_quantize`` runs ``_weight_quant`` on the
# bf16 tensor -- scale = 1 / (mean of |W|, clamped below at 1e-5), u = round(W * scale) clamped to
# [-1, 1], every step a bf16 tensor op -- and stores transformers' ``pack_weights(u)`` under the name
# and ``scale.view(1)`` (bf16) under the name with "weight" replaced by "weight_scale".
# ``convert_to_bf16`` makes the same selection and stores u / scale (bf16) instead.
ONEBITLLMS_NOT_QUANTIZED = (
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "input_layernorm",
    "post_attention_layernorm",
)


def onebitllms_selects(name: str) -> bool:
    return all(s not in name for s in ONEBITLLMS_NOT_QUANTIZED)


def onebitllms_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.to(torch.bfloat16)  # the model is loaded in bf16 whatever the files hold
    scale = 1.0 / torch.clamp(torch.mean(torch.abs(w)), min=1e-5)
    return torch.clamp(torch.round(w * scale), -1, 1), scale


def transformers_bitlinear_weights(family: str, preset: str) -> set[str]:
    """The weights transformers' BitNet quantizer turns into BitLinear, skipping what
    ``get_keys_to_not_convert`` names (what both onebitllms and our quantization_config leave out)."""
    cfg = preset_config(preset)
    with torch.device("meta"):
        model = (FalconH1ForCausalLM if family == "falcon_h1" else LlamaForCausalLM)(cfg)
    replace_with_bitnet_linear(model, modules_to_not_convert=get_keys_to_not_convert(model))
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BitLinear)}


def meta_state_dict(preset: str) -> list[str]:
    cfg = preset_config(preset)
    with torch.device("meta"):
        model = (FalconH1ForCausalLM if cfg.model_type == "falcon_h1" else LlamaForCausalLM)(cfg)
    return list(model.state_dict())


# --- which tensors are quantized ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", LLAMA_PRESETS)
def test_llama_rule_is_onebitllms_skip_list(preset):
    keys = meta_state_dict(preset)
    ours = {k for k in keys if FAMILIES["llama"].bitnet.is_weight(k)}
    assert ours == transformers_bitlinear_weights("llama", preset)
    assert len(ours) == 7 * preset_config(preset).num_hidden_layers
    # onebitllms' own rule selects the same weights; on a biased model it would also take the biases
    # (and store their scale under the bias's own name); transformers' BitLinear keeps a bias unquantized.
    theirs = {k for k in keys if onebitllms_selects(k)}
    assert ours == {k for k in theirs if k.endswith(".weight")}
    assert all(k.endswith(".bias") for k in theirs - ours)


@pytest.mark.parametrize("preset", FALCON_PRESETS)
def test_falcon_h1_rule_is_the_bitlinear_modules_never_the_llama_list(preset):
    keys = meta_state_dict(preset)
    ours = {k for k in keys if FAMILIES["falcon_h1"].bitnet.is_weight(k)}
    assert ours == transformers_bitlinear_weights("falcon_h1", preset)
    # The reference tool's Llama list on Falcon-H1 would ternarize Mamba parameters and norms.
    wrongly = {k for k in keys if onebitllms_selects(k)} - ours
    for part in ("A_log", "mamba.D", "dt_bias", "conv1d.weight", "pre_ff_layernorm.weight", "final_layernorm.weight"):
        assert any(k.endswith(part) for k in wrongly), part


# --- pack: onebitllms' bytes ------------------------------------------------------------------------------


def source_folder(tmp_path, preset: str, weights: str):
    """bf16 weights; bf16 weights under a config.json that says float32; fp32 weights. Biases get random
    values (transformers' init, which make-tiny uses, leaves them 0)."""
    folder = tmp_path / f"{preset}-{weights}"
    make_tiny(folder, preset, seed=5, dtype="fp32" if weights == "fp32" else "bf16")
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for key, value in tensors.items():
        if key.endswith(".bias"):
            tensors[key] = (torch.randn(value.shape, generator=generator) * 0.1).to(value.dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if weights == "bf16-config-fp32":
        config = json.loads((folder / "config.json").read_text())
        config["dtype"] = "float32"
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("weights", ["bf16", "bf16-config-fp32", "fp32"])
@pytest.mark.parametrize("preset", FALCON_PRESETS + LLAMA_PRESETS)
def test_pack_is_onebitllms_byte_for_byte(tmp_path, preset, weights):
    src = source_folder(tmp_path, preset, weights)
    report = pack_checkpoint(src, tmp_path / "packed")
    latent, packed = load_hf(src), load_hf(tmp_path / "packed")
    family = family_of(preset_config(preset)).hf_model_type
    selected = transformers_bitlinear_weights(family, preset)
    if family == "llama":  # the reference tool's own selection, on the weights
        assert selected == {k for k in latent if onebitllms_selects(k) and k.endswith(".weight")}
    assert report.quantized == {"latent": len(selected)} and report.arithmetic == "onebitllms"
    for key, value in latent.items():
        if key not in selected:
            assert torch.equal(packed[key], value), key  # --dtype keep: untouched
            continue
        u, scale = onebitllms_ternary(value)
        scale_key = key.replace("weight", "weight_scale")
        assert packed[key].dtype == torch.uint8 and torch.equal(packed[key], pack_weights(u)), key
        assert packed[scale_key].dtype == torch.bfloat16, scale_key
        assert torch.equal(packed[scale_key].view(torch.int16), scale.view(1).view(torch.int16)), scale_key
    assert set(packed) == set(latent) | {k.replace("weight", "weight_scale") for k in selected}


@pytest.mark.parametrize("linear_class", LINEAR_CLASSES)
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_unpack_is_onebitllms_convert_to_bf16(tmp_path, preset, linear_class):
    """Unpacking our packed model in bf16 gives onebitllms' ``convert_to_bf16`` output (u / scale in bf16),
    whichever weight_scale convention was stored. Equal as values: onebitllms keeps round()'s -0.0 for
    small negative weights, which the packed format (field 1 = 0) has no sign for."""
    src = source_folder(tmp_path, preset, "bf16")
    pack_checkpoint(src, tmp_path / "packed", linear_class=linear_class)
    unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype="bf16")
    latent, plain = load_hf(src), load_hf(tmp_path / "plain")
    family = family_of(preset_config(preset)).hf_model_type
    for key in transformers_bitlinear_weights(family, preset):
        u, scale = onebitllms_ternary(latent[key])
        assert plain[key].dtype == torch.bfloat16 and torch.equal(plain[key], u / scale), key


def test_fp32_arithmetic_is_an_explicit_option(tmp_path):
    src = source_folder(tmp_path, "llama-tiny", "fp32")
    pack_checkpoint(src, tmp_path / "packed", arithmetic="fp32")
    latent, packed = load_hf(src), load_hf(tmp_path / "packed")
    differ = 0
    for key in transformers_bitlinear_weights("llama", "llama-tiny"):
        w = latent[key]
        scale = 1.0 / w.abs().mean().clamp(min=1e-5)
        u = (w * scale).round().clamp(-1, 1)
        assert torch.equal(packed[key], pack_weights(u)), key
        assert packed[key + "_scale"].dtype == torch.float32 and torch.equal(packed[key + "_scale"], scale.view(1))
        differ += int((onebitllms_ternary(w)[0] != u).sum())
    assert differ > 0  # the option exists because the two patterns differ


def test_family_without_bitnet_rule_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "llama", dataclasses.replace(FAMILIES["llama"], bitnet=None))
    make_tiny(tmp_path / "hf", "llama-tiny")
    with pytest.raises(UnsupportedError, match="BitNet is not supported for Llama models"):
        pack_checkpoint(tmp_path / "hf", tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


# --- Llama: round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,linear_class", [("llama-tiny-bias", "bitlinear"), ("llama-tiny", "autobitlinear")])
def test_llama_packed_plain_packed_bit_exact(tmp_path, preset, linear_class):
    src = source_folder(tmp_path, preset, "bf16")
    pack_checkpoint(src, tmp_path / "packed", linear_class=linear_class)
    unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype="fp32")
    again = pack_checkpoint(tmp_path / "plain", tmp_path / "again", dtype="bf16")
    assert again.quantized == {"record": 28} and again.linear_class == linear_class
    assert_bit_exact(load_hf(tmp_path / "packed"), load_hf(tmp_path / "again"))
    assert (tmp_path / "packed/config.json").read_bytes() == (tmp_path / "again/config.json").read_bytes()


def mark_megatron_bitnet(meg) -> None:
    """What a Megatron-LM ``--use-bitnet`` run saves: latent weights and the flag in ``args``."""
    for path in sorted(meg.glob("release/mp_rank_*/model_optim_rng.pt")):
        state = torch.load(path, weights_only=False)
        state["args"].use_bitnet = True
        torch.save(state, path)


@pytest.mark.parametrize("linear_class", LINEAR_CLASSES)
@pytest.mark.parametrize("weights", ["bf16", "fp32"])
def test_llama_packed_megatron_tp2_reshard_packed_bit_exact(tmp_path, linear_class, weights):
    src = source_folder(tmp_path, "llama-tiny", weights)  # fp32: fp32 tensors beside bf16 weight_scales
    packed = tmp_path / "packed"
    pack_checkpoint(src, packed, linear_class=linear_class)
    hf_to_megatron(packed, tmp_path / "meg", tp=2, layout="local")  # Megatron-LM BitNet: the local spec
    meg = LegacyCheckpoint(tmp_path / "meg")
    assert meg.args.use_bitnet and meg.args.bitnet_linear_class == linear_class
    assert meg.args.bitnet_scale_dtype == "bfloat16" and len(meg.args.bitnet_weight_scales) == 28
    megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    assert_bit_exact(load_hf(packed), load_hf(tmp_path / "back"))
    assert (tmp_path / "back/config.json").read_bytes() == (packed / "config.json").read_bytes()

    reshard(tmp_path / "meg", tmp_path / "tp1pp2", tp=1, pp=2)
    reshard(tmp_path / "tp1pp2", tmp_path / "tp4", tp=4)
    for resharded in ("tp1pp2", "tp4"):
        megatron_to_hf(tmp_path / resharded, tmp_path / f"back-{resharded}")
        assert_bit_exact(load_hf(packed), load_hf(tmp_path / f"back-{resharded}"))


def test_llama_megatron_bitnet_latent_export_is_onebitllms(tmp_path):
    src = source_folder(tmp_path, "llama-tiny", "bf16")
    hf_to_megatron(src, tmp_path / "meg", tp=2, layout="local")
    mark_megatron_bitnet(tmp_path / "meg")
    megatron_to_hf(tmp_path / "meg", tmp_path / "packed")  # use_bitnet: packed by default
    latent, packed = load_hf(src), load_hf(tmp_path / "packed")
    selected = {k for k in latent if onebitllms_selects(k)}
    assert len(selected) == 28
    for key in selected:
        u, scale = onebitllms_ternary(latent[key])
        assert torch.equal(packed[key], pack_weights(u)), key
        assert torch.equal(packed[key + "_scale"].view(torch.int16), scale.view(1).view(torch.int16)), key
    config = json.loads((tmp_path / "packed/config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]

    megatron_to_hf(tmp_path / "meg", tmp_path / "packed32", bitnet_arithmetic="fp32")
    scale = load_file(tmp_path / "packed32/model.safetensors")["model.layers.0.self_attn.q_proj.weight_scale"]
    w = latent["model.layers.0.self_attn.q_proj.weight"].float()
    assert scale.dtype == torch.float32 and torch.equal(scale, (1.0 / w.abs().mean()).view(1))


# --- transformers loads the packed Llama and runs it ----------------------------------------------------


def assert_runs_like_unpacked(packed, plain, layer):
    """Both models run in float64 (loaded, then cast: transformers unpacks AutoBitLinear weights in the
    load dtype it built the module with, fp32): the packed one computes ``(x_q·t)·scale`` (or ``/ (s_x·scale)``) where
    the reference computes ``x_q·(t·m)``; in fp32 that reordering flips an activation's int8 rounding now
    and then (measured 5.5e-4 on logits). In float64 what is left is the reference's magnitude ``m``,
    rounded to fp32 when unpacked (measured 5.1e-8 on logits of size ~0.5)."""
    hf_logging.set_verbosity_error()
    quantized = LlamaForCausalLM.from_pretrained(packed).double().eval()
    reference = LlamaForCausalLM.from_pretrained(plain).double().eval()
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, layer)
    assert isinstance(quantized.model.layers[1].mlp.down_proj, layer)
    assert type(quantized.lm_head) is torch.nn.Linear
    bitnet = FAMILIES["llama"].bitnet
    hook = act_fake_quant(torch.float32 if layer is AutoBitLinear else None)
    hooked = 0
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and bitnet.is_weight(f"{name}.weight"):
            module.register_forward_pre_hook(hook)
            hooked += 1
    assert hooked == 28
    ids = torch.randint(0, 317, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = quantized(ids).logits, reference(ids).logits
    # A wrong scale convention is off by ~1 (reference §1.2).
    assert (got - want).abs().max() < 1e-6, float((got - want).abs().max())


@pytest.mark.parametrize(
    "preset,linear_class,layer",
    [(p, "bitlinear", BitLinear) for p in LLAMA_PRESETS]
    + [(p, "autobitlinear", AutoBitLinear) for p in LLAMA_PRESETS if p != "llama-tiny-bias"],
)
def test_transformers_runs_the_packed_llama(tmp_path, preset, linear_class, layer):
    pack_checkpoint(source_folder(tmp_path, preset, "fp32"), tmp_path / "packed", linear_class=linear_class)
    unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype="fp32")
    assert_runs_like_unpacked(tmp_path / "packed", tmp_path / "plain", layer)


@pytest.mark.parametrize("preset", ["llama-tiny-bias", "tiny-bias-tied"])
def test_autobitlinear_with_biases_refused(tmp_path, preset):
    """transformers' AutoBitLinear computes (x·t + b)·weight_scale: with the bias as stored, its logits
    were measured 0.78 off the unpacked reference (BitLinear, which adds b after: 5.6e-8)."""
    src = source_folder(tmp_path, preset, "bf16")
    with pytest.raises(UnsupportedError, match=r"\.bias: transformers' AutoBitLinear multiplies the bias"):
        pack_checkpoint(src, tmp_path / "packed", linear_class="autobitlinear")
    assert not (tmp_path / "packed").exists()
    pack_checkpoint(src, tmp_path / "packed")
    config = json.loads((tmp_path / "packed/config.json").read_text())
    config["quantization_config"]["linear_class"] = "autobitlinear"
    (tmp_path / "packed/config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="AutoBitLinear multiplies the bias"):
        hf_to_megatron(tmp_path / "packed", tmp_path / "meg")


def test_transformers_runs_the_megatron_export(tmp_path):
    src = source_folder(tmp_path, "llama-tiny-tied", "fp32")
    hf_to_megatron(src, tmp_path / "meg", tp=2, layout="local")
    mark_megatron_bitnet(tmp_path / "meg")
    megatron_to_hf(tmp_path / "meg", tmp_path / "packed")
    unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype="fp32")
    assert_runs_like_unpacked(tmp_path / "packed", tmp_path / "plain", BitLinear)
