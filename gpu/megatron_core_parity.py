"""Our Megatron shards in megatron-core's OWN layers, against transformers' Falcon-H1 modules.

What it proves
--------------
``h1bridge hf-to-megatron`` writes legacy tensor-parallel shards whose per-rank layout (Mamba-2
``in_proj`` split z|x|B|C|dt block by block, ``conv1d`` x|B|C, per-query-group QKV interleave,
row-parallel ``out_proj`` / ``linear_proj``) is meant to be exactly what megatron-core's layers
expect. This script loads each rank's shard into megatron-core's own modules and feeds them the
same hidden states as the matching transformers modules of the same layer:

* ``megatron.core.ssm.mamba_mixer.MambaMixer`` (``ColumnParallelLinear`` in_proj,
  ``RowParallelLinear`` out_proj, ``use_mamba_mem_eff_path=False``, ``rmsnorm`` = the checkpoint's
  ``mamba_rms_norm``) vs ``transformers``' ``FalconH1Mixer`` (eval mode, its pure-torch path);
* the local-spec ``SelfAttention`` (``get_gpt_layer_local_spec()``, no Transformer Engine, RoPE with
  ``rope_theta`` from config.json, all fusions off) vs ``FalconH1Attention`` (eager, causal mask).

Outputs are compared in fp32 (TF32 off) for every layer; the row-parallel all-reduce happens inside
megatron-core, so every rank holds the full output. With ``--wrong`` it also loads two deliberately
wrong layouts built from the HF weights -- the packed ``in_proj`` split as one tensor
(``chunk(tp)``; only differs from the right layout at TP > 1) and Q|K|V concatenated and split as
one tensor (wrong at any TP) -- to show that the check separates right from wrong.

µP multipliers are Megatron-Bridge-specific (plain megatron-core has none), so the checkpoint
must have every multiplier = 1; the script refuses others.

The transformers side is an independent reference: transformers binds its Mamba-2 scan to an
installed ``mamba_ssm`` at import time, so this script imports it with ``mamba_ssm`` /
``causal_conv1d`` hidden and checks that every scan/conv function is transformers' own torch code.

How to run
----------
The whole recipe (wheels and Triton kernels carried to an offline GPU machine, checkpoints built by
``h1bridge``) is ``gpu/prepare_carry.sh`` here, then ``gpu/run_parity.sh OUTDIR 1 2 4`` there; see
``gpu/README.md``. By hand, on a machine with CUDA, megatron-core 0.16.1, transformers (FalconH1),
einops and mamba-ssm's Triton kernels importable, from the repo root::

    torchrun --nproc_per_node=TP gpu/megatron_core_parity.py \\
        --case norm_on=HF_DIR,MEGATRON_DIR [--case ...] [--wrong] [--backend nccl|gloo] \\
        [--seq 320 --batch 2 --seed 0] [--json results.jsonl]

Every ``MEGATRON_DIR`` must have TP = the number of processes. ``--backend gloo`` lets several
ranks share one GPU (NCCL refuses two ranks on one device); the collectives are then gloo's
CUDA all-reduce, the layers and their per-rank layout are unchanged. ``--device cpu`` runs only
the attention half on the CPU (a debugging aid; MambaMixer needs CUDA).

Exit code 0 when every right-layout comparison is within ``--rtol`` (relative to max|reference|)
and, with ``--wrong``, every wrong layout is off by more than ``--wrong-min-rel``; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--case",
        action="append",
        required=True,
        metavar="NAME=HF_DIR,MEGATRON_DIR",
        help="a checkpoint pair to check (repeatable)",
    )
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--seq",
        type=int,
        default=320,
        help="tokens per sequence (> mamba_chunk_size exercises the inter-chunk state passing)",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--input-scale",
        type=float,
        default=4.0,
        help="std of the random hidden states; the tiny models' 0.02-std weights need ~4 "
        "for O(1) projections, so the SSM state term is not drowned by D*x",
    )
    p.add_argument("--wrong", action="store_true", help="also check deliberately wrong layouts")
    p.add_argument("--rtol", type=float, default=1e-3, help="pass bound on max|Δ| / max|ref|")
    p.add_argument(
        "--wrong-min-rel", type=float, default=1e-2, help="a wrong layout must be off by more than this (relative)"
    )
    p.add_argument("--json", type=Path, help="rank 0 appends one JSON line per result here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Checkpoint reading (self-contained: the GPU machine does not install the project)
# ---------------------------------------------------------------------------------------------


def load_rank_file(meg_dir: Path, tp_rank: int) -> dict:
    """The rank's ``model_optim_rng.pt`` of the tracked iteration, tensors only (weights_only)."""
    tracker = meg_dir / "latest_checkpointed_iteration.txt"
    it = tracker.read_text().strip()
    it_dir = meg_dir / ("release" if it == "release" else f"iter_{int(it):07d}")
    path = it_dir / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def count_tp(meg_dir: Path) -> int:
    it = (meg_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    it_dir = meg_dir / ("release" if it == "release" else f"iter_{int(it):07d}")
    return sum(1 for d in it_dir.iterdir() if d.is_dir() and d.name.startswith("mp_rank_"))


def sub_state_dict(model_sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in model_sd.items() if k.startswith(prefix)}


def check_multipliers(cfg) -> None:
    names = [
        "embedding_multiplier",
        "lm_head_multiplier",
        "key_multiplier",
        "attention_in_multiplier",
        "attention_out_multiplier",
        "ssm_in_multiplier",
        "ssm_out_multiplier",
    ]
    bad = {n: getattr(cfg, n) for n in names if float(getattr(cfg, n, 1.0)) != 1.0}
    for n in ("mlp_multipliers", "ssm_multipliers"):
        if any(float(v) != 1.0 for v in getattr(cfg, n, []) or []):
            bad[n] = getattr(cfg, n)
    if bad:
        raise SystemExit(f"µP multipliers must be 1 for a raw megatron-core comparison, found {bad}")


# ---------------------------------------------------------------------------------------------
# transformers reference
# ---------------------------------------------------------------------------------------------

_KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")
_KERNEL_FUNCS = (
    "mamba2_chunk_scan",
    "mamba2_split_conv1d_scan_combined",
    "mamba2_selective_state_update",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)


def import_transformers_reference():
    """Imports transformers' Falcon-H1 with mamba_ssm / causal_conv1d hidden.

    transformers binds ``mamba2_chunk_scan`` & co. at import time to an installed ``mamba_ssm``'s
    kernels when it finds one -- the very Triton kernels megatron-core's MambaMixer runs. Hidden, they
    bind to transformers' own pure-torch implementations, an independent reference. Returns the
    modeling module and, per function, the module its implementation comes from.
    """
    import inspect

    for pkg in _KERNEL_PACKAGES:
        if sys.modules.get(pkg) is not None:
            raise RuntimeError(f"{pkg} imported before transformers' reference; import order broken")
        sys.modules[pkg] = None  # makes `import pkg` raise ImportError
    try:
        import transformers.models.falcon_h1.modeling_falcon_h1 as modeling
    finally:
        for pkg in _KERNEL_PACKAGES:
            del sys.modules[pkg]
    bound = {}
    for name in _KERNEL_FUNCS:
        fn = getattr(modeling, name, None)
        if fn is None:
            continue
        try:
            impl = inspect.getclosurevars(fn).nonlocals.get("implementation", fn)
        except TypeError:
            impl = fn
        bound[name] = getattr(impl, "__module__", "?")
    foreign = {n: m for n, m in bound.items() if not m.startswith("transformers.")}
    if foreign:
        raise RuntimeError(f"transformers' Falcon-H1 bound to non-torch kernels: {foreign}")
    return modeling, bound


# ---------------------------------------------------------------------------------------------
# megatron-core modules
# ---------------------------------------------------------------------------------------------


def megatron_config(cfg, tp: int, device: str):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        mamba_state_dim=cfg.mamba_d_state,
        mamba_head_dim=cfg.mamba_d_head,
        mamba_num_groups=cfg.mamba_n_groups,
        mamba_num_heads=cfg.mamba_n_heads,
        use_mamba_mem_eff_path=False,
        tensor_model_parallel_size=tp,
        params_dtype=torch.float32,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=bool(cfg.projectors_bias),
        add_qkv_bias=bool(cfg.attention_bias),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        perform_initialization=False,  # every weight is loaded from the shard
        use_cpu_initialization=(device == "cpu"),
    )


def build_mamba(mcfg, cfg, layer: int, pgc):
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if cfg.mamba_proj_bias:
        raise SystemExit("megatron-core's MambaMixer has no in_proj bias; use a preset without mamba_proj_bias")
    if cfg.mamba_norm_before_gate:
        raise SystemExit("megatron-core's MambaMixer requires norm_before_gate=False")
    return MambaMixer(
        mcfg,
        MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        d_model=cfg.hidden_size,
        d_conv=cfg.mamba_d_conv,
        rmsnorm=bool(cfg.mamba_rms_norm),
        norm_before_gate=False,
        conv_bias=bool(cfg.mamba_conv_bias),
        bias=False,
        chunk_size=cfg.mamba_chunk_size,
        layer_number=layer + 1,
        pg_collection=pgc,
    )


def build_attention(mcfg, layer: int, pgc):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.self_attention
    return build_module(spec, config=mcfg, layer_number=layer + 1, pg_collection=pgc)


def load_into(module, sd: dict, what: str) -> None:
    """strict=False, but only ``_extra_state`` may be missing and nothing may be left over."""
    res = module.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"{what}: missing {missing}, unexpected {res.unexpected_keys}")
    for name, p in module.state_dict().items():
        if name in sd and tuple(p.shape) != tuple(sd[name].shape):
            raise RuntimeError(f"{what}: {name} shape {tuple(p.shape)} vs shard {tuple(sd[name].shape)}")


# ---------------------------------------------------------------------------------------------
# Deliberately wrong layouts, built from the HF weights
# ---------------------------------------------------------------------------------------------


def wrong_in_proj(hf_mixer, tp: int, rank: int) -> torch.Tensor:
    """The packed z|x|B|C|dt in_proj split as ONE tensor (rows chunked in TP equal parts)."""
    return hf_mixer.in_proj.weight.detach().cpu().chunk(tp, dim=0)[rank].clone()


def wrong_qkv(hf_attn, tp: int, rank: int) -> torch.Tensor:
    """Q|K|V concatenated and split as ONE tensor (no per-query-group interleave)."""
    w = torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight], 0)
    return w.detach().cpu().chunk(tp, dim=0)[rank].clone()


# ---------------------------------------------------------------------------------------------


def stats(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out.double() - ref.double()).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "ref_max": ref.abs().max().item()}


def reduce_max(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    hf_modeling, hf_bound = import_transformers_reference()  # before megatron imports mamba_ssm
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # Debugging aid only: megatron-core moves the RoPE table to torch.cuda.current_device().
        torch.cuda.current_device = lambda: "cpu"
    dist.init_process_group(backend=args.backend if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        RotaryEmbedding,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from transformers import FalconH1Config

    FalconH1ForCausalLM = hf_modeling.FalconH1ForCausalLM

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    if args.device == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    else:  # debugging aid only: no CUDA RNG to fork (dropout is 0 anyway)
        import contextlib

        class _NoFork:
            def fork(self, *a, **k):
                return contextlib.nullcontext()

        tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoFork()
        try:
            import megatron.core.ssm.mamba_mixer as _mm

            _mm.get_cuda_rng_tracker = tensor_parallel.get_cuda_rng_tracker
        except ImportError:
            pass
    # MambaMixer needs mamba-ssm's kernels (and CUDA); the CPU debug path runs it only when a
    # stand-in mamba_ssm is importable.
    try:
        from megatron.core.ssm import mamba_mixer

        run_mamba = mamba_mixer.HAVE_MAMBA_SSM
    except ImportError as e:
        print(f"rank {rank}: megatron.core.ssm.mamba_mixer not importable: {e}", flush=True)
        run_mamba = False
    if not run_mamba and args.device == "cuda":
        raise SystemExit("megatron.core.ssm.mamba_mixer could not import mamba_ssm's Triton kernels")
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()

    if rank == 0:
        import megatron.core
        import transformers

        print(
            f"world={world} backend={dist.get_backend()} device={device} torch={torch.__version__} "
            f"megatron-core={megatron.core.__version__} transformers={transformers.__version__}",
            flush=True,
        )
        print(f"transformers FalconH1 kernels bound to: {sorted(set(hf_bound.values()))}", flush=True)
        if run_mamba:
            from megatron.core.ssm import mamba_mixer as _mx

            print(
                f"megatron MambaMixer: mamba_chunk_scan_combined from "
                f"{getattr(_mx.mamba_chunk_scan_combined, '__module__', '?')}, causal_conv1d_fn="
                f"{'nn.Conv1d fallback' if _mx.causal_conv1d_fn is None else _mx.causal_conv1d_fn.__module__}, "
                f"RMSNormGated from {getattr(_mx.RMSNormGated, '__module__', '?')}",
                flush=True,
            )

    results, ok = [], True
    for case in args.case:
        name, paths = case.split("=", 1)
        hf_dir, meg_dir = (Path(p) for p in paths.split(","))
        tp = count_tp(meg_dir)
        if tp != world:
            raise SystemExit(f"{name}: {meg_dir} has TP={tp}, but {world} processes run")
        cfg = FalconH1Config.from_pretrained(hf_dir)
        check_multipliers(cfg)
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
        hf = FalconH1ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        hf = hf.to(device).eval()
        shard = load_rank_file(meg_dir, tp_rank)["model"]
        mcfg = megatron_config(cfg, tp, args.device)
        rope = RotaryEmbedding(
            kv_channels=cfg.head_dim,
            rotary_percent=1.0,
            rotary_base=theta,
            use_cpu_initialization=(args.device == "cpu"),
        )
        if rank == 0:
            print(
                f"[{name}] TP={tp} layers={cfg.num_hidden_layers} hidden={cfg.hidden_size} "
                f"mamba heads={cfg.mamba_n_heads} groups={cfg.mamba_n_groups} d_state={cfg.mamba_d_state} "
                f"rms_norm={cfg.mamba_rms_norm} attn heads={cfg.num_attention_heads} kv={cfg.num_key_value_heads} "
                f"rope_theta={theta:g} seq={args.seq} batch={args.batch}",
                flush=True,
            )

        per_module: dict[tuple[str, str], list[dict]] = {}
        for layer in range(cfg.num_hidden_layers):
            gen = torch.Generator().manual_seed(args.seed * 1000 + layer)
            x = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=gen).mul_(args.input_scale).to(device)
            x_sbh = x.transpose(0, 1).contiguous()
            hf_layer = hf.model.layers[layer]
            pfx = f"decoder.layers.{layer}."
            with torch.no_grad():
                todo = []
                # --- attention ---
                pos = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.batch, -1)
                cos, sin = hf.model.rotary_emb(x, pos)
                mask = torch.full((args.seq, args.seq), torch.finfo(torch.float32).min, device=device).triu(1)
                mask = mask[None, None].expand(args.batch, 1, -1, -1)
                ref_attn = hf_layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)[0]
                attn_sd = sub_state_dict(shard, pfx + "self_attention.")
                todo.append(("attention", "right", attn_sd, ref_attn))
                if args.wrong:
                    todo.append(
                        (
                            "attention",
                            "wrong:qkv-one-tensor",
                            dict(attn_sd, **{"linear_qkv.weight": wrong_qkv(hf_layer.self_attn, tp, tp_rank)}),
                            ref_attn,
                        )
                    )
                # --- mamba ---
                if run_mamba:
                    ref_mamba = hf_layer.mamba(hidden_states=x, cache_params=None, attention_mask=None)
                    mamba_sd = sub_state_dict(shard, pfx + "mamba_mixer.")
                    todo.append(("mamba", "right", mamba_sd, ref_mamba))
                    if args.wrong and tp > 1:
                        todo.append(
                            (
                                "mamba",
                                "wrong:in_proj-one-tensor",
                                dict(mamba_sd, **{"in_proj.weight": wrong_in_proj(hf_layer.mamba, tp, tp_rank)}),
                                ref_mamba,
                            )
                        )

                for module, layout, sd, ref in todo:
                    if module == "attention":
                        m = build_attention(mcfg, layer, pgc)
                        load_into(m, sd, f"{name} layer {layer} attention ({layout})")
                        m = m.to(device).eval()
                        # On CUDA megatron-core builds its own causal mask (attn_mask_type=causal, mask
                        # None); its default mask lives on "cuda", so the CPU debug path passes it.
                        mc_mask = (
                            None
                            if args.device == "cuda"
                            else torch.ones(args.seq, args.seq, dtype=torch.bool).triu(1)[None, None]
                        )
                        out, bias = m(x_sbh, attention_mask=mc_mask, rotary_pos_emb=rope(args.seq))
                    else:
                        m = build_mamba(mcfg, cfg, layer, pgc)
                        load_into(m, sd, f"{name} layer {layer} mamba ({layout})")
                        m = m.to(device).eval()
                        out, bias = m(x_sbh)
                    if bias is not None:
                        out = out + bias
                    out = out.transpose(0, 1).float()
                    s = stats(out, ref.float())
                    s["max_abs"], s["mean_abs"], s["ref_max"] = reduce_max(
                        [s["max_abs"], s["mean_abs"], s["ref_max"]], device
                    )
                    per_module.setdefault((module, layout), []).append(s)

        for (module, layout), rows in per_module.items():
            max_abs = max(r["max_abs"] for r in rows)
            rel = max(r["max_abs"] / r["ref_max"] for r in rows)
            res = {
                "case": name,
                "tp": tp,
                "backend": dist.get_backend(),
                "module": module,
                "layout": layout,
                "layers": len(rows),
                "max_abs": max_abs,
                "max_rel": rel,
                "mean_abs": max(r["mean_abs"] for r in rows),
                "ref_max": max(r["ref_max"] for r in rows),
            }
            res["pass"] = rel <= args.rtol if layout == "right" else rel > args.wrong_min_rel
            ok &= res["pass"]
            results.append(res)
            if rank == 0:
                print(
                    f"  {module:9s} {layout:26s} TP={tp} max|Δ|={max_abs:.3e} rel={rel:.3e} "
                    f"max|ref|={res['ref_max']:.3e} -> {'OK' if res['pass'] else 'FAIL'}",
                    flush=True,
                )
        del hf, shard

    if rank == 0 and args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done in {time.time() - t0:.1f}s, rc={rc}", flush=True)
    sys.exit(rc)
