"""BitNet ternary weights: the quantizer and packing against transformers, the scale design, and the
HF packed <-> HF plain <-> Megatron paths bit for bit; transformers runs the packed model on CPU."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tree_digest
from safetensors.torch import load_file, save_file
from test_roundtrip import assert_bit_exact, load_hf
from transformers import FalconH1ForCausalLM
from transformers.integrations.bitnet import (
    AutoBitLinear,
    BitLinear,
    WeightQuant,
    pack_weights,
    unpack_weights,
)
from transformers.utils import logging as hf_logging

import cli
from bridge.engine.convert import hf_to_megatron, megatron_to_hf
from bridge.errors import InputError, UnsupportedError
from bridge.families.falcon_h1 import BITNET
from bridge.features import bitnet
from bridge.features.bitnet import (
    dequantize,
    pack,
    pack_checkpoint,
    quantize,
    ternarize,
    unpack,
    unpack_checkpoint,
)
from bridge.formats.legacy import LegacyCheckpoint
from bridge.tiny import make_tiny
from mappings import FALCON_H1

is_bitnet_weight = BITNET.is_weight

LINEAR_CLASSES = ("bitlinear", "autobitlinear")


@pytest.fixture(autouse=True)
def eager_transformers():
    """transformers torch.compiles unpack_weights and the activation quantizer; compiling them on CPU
    takes ~25 s for the tiny model. Eager runs the same Python code (logit diffs were identical)."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bitnet") / "hf-bf16"
    make_tiny(folder, "tiny", seed=3, dtype="bf16")
    (folder / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return folder


@pytest.fixture(scope="module")
def packed_bf16(hf_bf16, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bitnet") / "packed-bf16"
    pack_checkpoint(hf_bf16, folder)
    return folder


# --- the quantizer and the packing, against transformers ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 48), (472, 64), (3, 5)])
def test_fp32_arithmetic_is_transformers_weight_quant(shape, dtype):
    """The explicit fp32 variant: transformers' ``WeightQuant`` run on the weight cast to fp32."""
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02).to(dtype)
    t, s = quantize(w, "fp32")
    assert t.dtype == torch.int8 and s.dtype == torch.float32
    w32 = w.float()
    wq = WeightQuant.apply(w32)  # t / s in fp32; s > 0, so its sign is t and its magnitude 1/s
    assert torch.equal(wq.sign().to(torch.int8), t)
    assert torch.equal(wq.abs().max(), 1.0 / s)
    assert torch.equal(s, 1.0 / w32.abs().mean())


def test_quantize_rounds_ties_half_to_even():
    w = torch.tensor([1.5, 0.25, -0.25, 0.0])  # mean|W| = 0.5: the middle two sit exactly on ±0.5
    for arithmetic in ("onebitllms", "fp32"):
        t, s = quantize(w, arithmetic)
        assert float(s) == 2.0 and t.tolist() == [1, 0, 0, 0]
    assert torch.floor(w * 2 + 0.5).clamp(-1, 1).tolist() == [1, 1, 0, 0]  # the Triton kernel's half-up
    assert quantize(torch.zeros(4, 4), "fp32")[1] == 1 / torch.tensor(1e-5)  # the absmean floor
    assert quantize(torch.zeros(4, 4))[1] == 1 / torch.tensor(1e-5, dtype=torch.bfloat16)


@pytest.mark.parametrize("shape", [(8, 3), (2048, 512), (10, 2), (1, 5), (7,), (16,)])
def test_pack_unpack_bit_identical_to_transformers(shape):
    t = torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.int8)
    original = t.clone()
    packed = pack(t)
    assert torch.equal(t, original)  # unlike pack_weights, pack leaves its input alone
    assert packed.dtype == torch.uint8 and torch.equal(packed, pack_weights(t.clone()))
    assert torch.equal(unpack(packed, shape[0]), t)
    assert torch.equal(unpack_weights(packed, torch.float32)[: shape[0]], t.float())


def test_pack_layout_is_blocked():
    column = torch.tensor([[1], [-1], [0], [-1], [-1], [1], [1], [1]], dtype=torch.int8)
    assert pack(column).flatten().tolist() == [0b10000110, 0b10100000]  # reference §1.1 worked example


# --- which tensors are BitNet linears --------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-bias-tied"])
def test_bitnet_linears_are_the_models_linears(preset):
    from bridge.tiny import preset_config

    cfg = preset_config(preset)
    with torch.device("meta"):
        model = FalconH1ForCausalLM(cfg)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - {"lm_head"} == set(BITNET.modules(model.state_dict()))
    table_keys = {k for p in FALCON_H1 for k in p.hf}
    assert BITNET.only is not None and {f"{m}.weight" for m in BITNET.only} <= table_keys
    packed = {k for k in model.state_dict() if is_bitnet_weight(k)}
    assert len(packed) == 9 * cfg.num_hidden_layers
    assert not any(
        is_bitnet_weight(k)
        for k in (
            "lm_head.weight",
            "model.layers.0.mamba.in_proj.bias",
            "model.layers.0.mamba.conv1d.weight",
            "model.layers.0.mamba.D",
        )
    )


# --- the scale design --------------------------------------------------------------------------------


def bf16_reciprocal_misses():
    """bf16 scales s with bf16(1/bf16(1/s)) != s: the unpacked magnitude cannot tell them apart."""
    s = torch.arange(0x3F80, 0x4080, dtype=torch.int16).view(torch.bfloat16)  # every bf16 in [1, 4)
    back = (1.0 / (1.0 / s.double()).to(torch.bfloat16).double()).to(torch.bfloat16)
    return s[back != s]


def test_plain_requantize_loses_the_scale_and_the_record_restores_it():
    t = torch.randint(-1, 2, (64, 32), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    for scale in bf16_reciprocal_misses()[:8]:
        w = dequantize(t, scale, "bitlinear", torch.bfloat16)
        t_plain, s = quantize(w, "fp32")
        share = (t != 0).float().mean()
        assert torch.equal(t_plain, t)  # absmean keeps the pattern of a ternary × m tensor ...
        assert torch.allclose(1 / s.double(), w.abs().max().double() * share, rtol=1e-6)  # ... but mean = m × share
        got, stored, how = ternarize(w, "bitlinear", recorded=float(scale))
        assert how == "record" and torch.equal(got, t) and torch.equal(stored.to(torch.bfloat16), scale)
        got, derived, how = ternarize(w, "bitlinear")
        assert how == "dequantized" and torch.equal(got, t) and derived.to(torch.bfloat16) != scale
        # a stale record (it does not reproduce w) is not trusted
        assert ternarize(w, "bitlinear", recorded=float(scale) * 2)[2] == "dequantized"
    assert len(bf16_reciprocal_misses()) > 0


def test_autobitlinear_needs_no_record():
    t = torch.randint(-1, 2, (64, 32), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scale = torch.tensor(0.0213623046875, dtype=torch.bfloat16)
    got, derived, how = ternarize(dequantize(t, scale, "autobitlinear", torch.bfloat16), "autobitlinear")
    assert how == "dequantized" and torch.equal(got, t) and derived.to(torch.bfloat16) == scale


@pytest.mark.parametrize("linear_class", LINEAR_CLASSES)
@pytest.mark.parametrize("unpack_dtype", ["keep", "fp32"])
def test_hf_packed_plain_packed_bit_exact(hf_bf16, tmp_path, linear_class, unpack_dtype):
    before = tree_digest(hf_bf16)
    report = pack_checkpoint(hf_bf16, tmp_path / "packed", linear_class=linear_class)
    assert report.linears == 36 and report.quantized == {"latent": 36}
    unpack_checkpoint(tmp_path / "packed", tmp_path / "plain", dtype=unpack_dtype)
    again = pack_checkpoint(tmp_path / "plain", tmp_path / "again", dtype="keep" if unpack_dtype == "keep" else "bf16")
    assert again.quantized == {"record": 36} and again.linear_class == linear_class
    assert_bit_exact(load_hf(tmp_path / "packed"), load_hf(tmp_path / "again"))
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert tree_digest(hf_bf16) == before

    packed, plain, latent = load_hf(tmp_path / "packed"), load_hf(tmp_path / "plain"), load_hf(hf_bf16)
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in config and len(config["bitnet_unpacked"]["weight_scale"]) == 36
    key = "model.layers.1.mamba.in_proj.weight"
    t, s = quantize(latent[key])
    scale = s if linear_class == "bitlinear" else 1.0 / s
    assert packed[key].shape == (472 // 4, 64) and torch.equal(packed[key], pack(t))
    assert packed[key + "_scale"].dtype == torch.bfloat16 and torch.equal(packed[key + "_scale"], scale.view(1))
    dtype = torch.float32 if unpack_dtype == "fp32" else torch.bfloat16
    assert torch.equal(plain[key], dequantize(t, packed[key + "_scale"], linear_class, dtype))
    assert torch.equal(plain["model.embed_tokens.weight"], latent["model.embed_tokens.weight"].to(dtype))


# --- Megatron ------------------------------------------------------------------------------------------


def test_hf_packed_megatron_tp2_hf_packed_bit_exact(packed_bf16, tmp_path):
    hf_to_megatron(packed_bf16, tmp_path / "meg", tp=2)
    meg = LegacyCheckpoint(tmp_path / "meg")
    assert meg.args.use_bitnet and meg.args.bitnet_linear_class == "bitlinear"
    assert len(meg.args.bitnet_weight_scales) == 36
    qkv = meg.model(0, 0)["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.dtype == torch.bfloat16 and len(qkv.abs().unique()) == 4  # 0 and the q, k, v magnitudes

    megatron_to_hf(tmp_path / "meg", tmp_path / "back", max_shard_size="100KB")  # BitNet: packed by default
    assert_bit_exact(load_hf(packed_bf16), load_hf(tmp_path / "back"))
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "back" / name).read_bytes() == (packed_bf16 / name).read_bytes()

    megatron_to_hf(tmp_path / "meg", tmp_path / "plain", bitnet_pack=False)
    unpack_checkpoint(packed_bf16, tmp_path / "unpacked")
    assert_bit_exact(load_hf(tmp_path / "unpacked"), load_hf(tmp_path / "plain"))
    assert (tmp_path / "plain" / "config.json").read_bytes() == (tmp_path / "unpacked" / "config.json").read_bytes()


@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_latent_export_quantizes_the_gathered_tensor(hf_preset, tmp_path, tp):
    src = hf_preset("tiny")
    hf_to_megatron(src, tmp_path / "meg", tp=tp)
    megatron_to_hf(tmp_path / "meg", tmp_path / "packed", bitnet_pack=True)
    latent, packed = load_hf(src), load_hf(tmp_path / "packed")
    for key in (k for k in latent if is_bitnet_weight(k)):
        t, s = quantize(latent[key])
        assert torch.equal(packed[key], pack(t)), key
        assert torch.equal(packed[key + "_scale"], s.reshape(1)), key
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"] == bitnet.default_quant_config("bitlinear", BITNET)

    # Per shard (Megatron-LM's BitNet forward) the scale and the pattern would differ.
    q = latent["model.layers.0.self_attn.q_proj.weight"]
    shard_t, shard_s = quantize(q[: q.shape[0] // tp], "fp32")
    full_t, full_s = quantize(q, "fp32")
    assert abs(float(shard_s / full_s) - 1) > 1e-3
    assert (shard_t != full_t[: q.shape[0] // tp]).any()


def test_fold_mup_refused_with_bitnet(packed_bf16, tmp_path):
    hf_to_megatron(packed_bf16, tmp_path / "meg")
    with pytest.raises(UnsupportedError, match="BitNet"):
        megatron_to_hf(tmp_path / "meg", tmp_path / "out", fold_mup=True)


# --- transformers loads and runs the packed model --------------------------------------------------------


def act_fake_quant(compute_dtype):
    """The per-token int8 activation quantization transformers runs before a BitNet linear, as a float
    round trip: ``BitLinear.activation_quant`` in the input's dtype, ``ActQuant`` in fp32."""

    def hook(module, args):
        x = args[0].to(compute_dtype or args[0].dtype)
        s = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
        return (((x * s).round().clamp(-128, 127) / s).to(args[0].dtype),)

    return hook


@pytest.mark.parametrize("linear_class,layer", [("bitlinear", BitLinear), ("autobitlinear", AutoBitLinear)])
def test_transformers_runs_the_packed_model(hf_preset, tmp_path, linear_class, layer):
    hf_logging.set_verbosity_error()
    pack_checkpoint(hf_preset("tiny"), tmp_path / "packed", linear_class=linear_class)
    unpack_checkpoint(tmp_path / "packed", tmp_path / "plain")
    quantized = FalconH1ForCausalLM.from_pretrained(tmp_path / "packed").eval()
    reference = FalconH1ForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert isinstance(quantized.model.layers[0].mamba.in_proj, layer)
    assert type(quantized.lm_head) is torch.nn.Linear
    for name, module in reference.named_modules():
        if is_bitnet_weight(f"{name}.weight"):
            module.register_forward_pre_hook(act_fake_quant(None))
    ids = torch.randint(0, 317, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = quantized(ids).logits, reference(ids).logits
    # Same fp32 math in another order ((x_q·t) / (s_x·scale) vs (x_q/s_x)·(t·m)): measured 2.4e-7 on
    # logits of size 0.66. A wrong scale convention is off by ~1 (reference §1.2).
    assert (got - want).abs().max() < 1e-5


# --- bad inputs: one line naming the key, the documented exit code, nothing left behind ----------------


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.stderr.strip(), result.stdout


def edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def set_field_3(tensors):
    tensors["model.layers.2.self_attn.o_proj.weight"][3, 5] |= 0b11 << 4


BAD_PACKED = {
    "shape vs config": (
        lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 64')
        ),
        "'model.layers.0.feed_forward.gate_proj.weight' has shape (32, 64), config expects (16, 64)",
    ),
    "missing weight_scale": (
        lambda f: edit_tensors(f, lambda t: t.pop("model.layers.1.mamba.out_proj.weight_scale")),
        "missing tensor 'model.layers.1.mamba.out_proj.weight_scale'",
    ),
    "field value 3": (
        lambda f: edit_tensors(f, set_field_3),
        "'model.layers.2.self_attn.o_proj.weight': packed byte (3, 5) holds the unused field value 3",
    ),
    "zero scale": (
        lambda f: edit_tensors(f, lambda t: t["model.layers.0.self_attn.q_proj.weight_scale"].zero_()),
        "'model.layers.0.self_attn.q_proj.weight_scale' = [0.0]",
    ),
}


@pytest.mark.parametrize("command", ["bitnet unpack", "hf-to-megatron"])
@pytest.mark.parametrize("case", list(BAD_PACKED))
def test_bad_packed_inputs(packed_bf16, tmp_path, case, command):
    src = tmp_path / "packed"
    shutil.copytree(packed_bf16, src)
    corrupt, message = BAD_PACKED[case]
    corrupt(src)
    before = tree_digest(src)
    exit_code, err, _ = run(*command.split(), src, tmp_path / "out", "--json")  # --json: no progress bar on stderr
    assert exit_code == 3, err
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and tree_digest(src) == before


def test_in_proj_rows_not_divisible_by_4_refused(tmp_path):
    # 2*d_ssm + 2*G*N + H = 2*208 + 2*2*8 + 26 = 474 rows
    make_tiny(tmp_path / "hf", "tiny", mamba_n_heads=26, mamba_n_groups=2)
    exit_code, err, _ = run("bitnet", "pack", tmp_path / "hf", tmp_path / "out")
    assert exit_code == 5 and "model.layers.0.mamba.in_proj.weight: 474 output rows" in err and "multiple of 4" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_quantization_configs(packed_bf16, tmp_path):
    src = tmp_path / "packed"
    shutil.copytree(packed_bf16, src)
    config = json.loads((src / "config.json").read_text())
    for quant, message in [
        ({"modules_to_not_convert": ["lm_head", "in_proj"]}, "leaves 'model.layers.0.mamba.in_proj'"),
        ({"use_rms_norm": True}, "use_rms_norm"),
        ({"quant_method": "fp8"}, "only 'bitnet'"),
    ]:
        (src / "config.json").write_text(
            json.dumps({**config, "quantization_config": {**config["quantization_config"], **quant}})
        )
        with pytest.raises(UnsupportedError, match=message):
            unpack_checkpoint(src, tmp_path / "out")
    with pytest.raises(InputError, match="already BitNet-packed"):
        pack_checkpoint(packed_bf16, tmp_path / "out")


def test_cli_pack_unpack_and_inspect(hf_bf16, tmp_path):
    exit_code, err, out = run(
        "bitnet", "pack", hf_bf16, tmp_path / "packed", "--linear-class", "autobitlinear", "--json"
    )
    assert exit_code == 0, err
    assert json.loads(out)["quantized"] == {"latent": 36}
    exit_code, _, out = run("inspect", tmp_path / "packed")
    assert "BitNet: ternary-packed (autobitlinear)" in out
    exit_code, _, out = run("bitnet", "unpack", tmp_path / "packed", tmp_path / "plain", "--dtype", "fp32")
    assert exit_code == 0 and "36 BitNet linears" in out
    exit_code, _, out = run("inspect", tmp_path / "plain")
    assert "BitNet: unpacked ternary × scale, 36 exact scales recorded" in out


def test_reshard_keeps_the_bitnet_scales(packed_bf16, tmp_path):
    from bridge.engine.reshard import reshard

    hf_to_megatron(packed_bf16, tmp_path / "meg", tp=2)
    reshard(tmp_path / "meg", tmp_path / "tp1", tp=1, pp=2)
    assert (
        LegacyCheckpoint(tmp_path / "tp1").args.bitnet_weight_scales
        == LegacyCheckpoint(tmp_path / "meg").args.bitnet_weight_scales
    )
    megatron_to_hf(tmp_path / "tp1", tmp_path / "back")
    assert_bit_exact(load_hf(packed_bf16), load_hf(tmp_path / "back"))
