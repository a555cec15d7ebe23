"""Structure-aware fuzzing of every input file the CLI reads, driven through the CLI.

Hypothesis mutates a valid tiny checkpoint: a safetensors header, ``config.json``, the index, the
tracker, a torch_dist ``.metadata`` (the unpickled ``Metadata`` object, re-pickled) and legacy rank
files (the state dict: args fields, tensor dtypes/shapes, missing keys). Hypothesis only *draws* the
mutations (derandomized); every mutated input of a class then runs through the CLI in ONE
subprocess (a small driver around ``CliRunner``: imports cost ~3 s a process) under an address-space
limit, with a per-case watchdog. Each case must end with a documented exit code other than 6, no
traceback, exactly one ``error:`` line (the last) when it fails, and its input unchanged.

``H1BRIDGE_FUZZ_EXAMPLES`` (``make fuzz``) raises the number of mutations per class.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.engine.convert import hf_to_megatron

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = int(os.environ.get("H1BRIDGE_FUZZ_EXAMPLES", "12"))
CASE_SECONDS = 30
MEMORY_LIMIT = 4 * 2**30  # address space: torch and the CLI import in ~3 GiB of it
DOCUMENTED = {0, 1, 2, 3, 4, 5}

# Runs each case of a JSON list through the CLI in-process; one JSON line per case in the results file.
# A case that outlives CASE_SECONDS is dumped by faulthandler and ends the process (the parent names it).
DRIVER = r"""
import faulthandler, json, sys
from click.testing import CliRunner
import cli
cases, results, limit = json.load(open(sys.argv[1])), open(sys.argv[2], "a"), int(sys.argv[3])
for i, args in enumerate(cases):
    faulthandler.dump_traceback_later(limit, exit=True)
    r = CliRunner().invoke(cli.main, args)
    faulthandler.cancel_dump_traceback_later()
    crash = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)
    results.write(json.dumps({"i": i, "code": r.exit_code, "stderr": r.stderr, "crash": crash}) + "\n")
    results.flush()
"""

SIZES = st.one_of(
    st.integers(-3, 10),
    st.sampled_from([0, 1, 63, 64, 65, 128, 317, 2**31 - 1, 2**31, 2**31 + 1, 2**40, 10**7, 2**63, 10**30]),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), SIZES, st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_batch(tmp: Path, cases: list[tuple[list[str], Path]]) -> None:
    """Runs every (CLI args, input) case in one limited subprocess and checks the CLI contract."""
    digests = [tree_digest(src) for _, src in cases]
    (tmp / "cases.json").write_text(json.dumps([args for args, _ in cases]))
    results = tmp / "results.jsonl"
    results.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp / "cases.json"), str(results), str(CASE_SECONDS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=_limit_memory,
        timeout=CASE_SECONDS * (len(cases) + 2),
        env={**os.environ, "PYTHONPATH": str(ROOT), "H1BRIDGE_DEBUG": ""},
    )
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if len(done) < len(cases):
        args = cases[len(done)][0]
        pytest.fail(f"case {args} did not finish (rc {proc.returncode}): {proc.stderr[-3000:]}")
    failures = []
    for result, (args, src), digest in zip(done, cases, digests, strict=True):
        err = result["stderr"].strip()
        lines = err.splitlines()
        problem = None
        if result["crash"] or "Traceback" in err:
            problem = f"crash {result['crash']}"
        elif result["code"] not in DOCUMENTED:
            problem = f"exit {result['code']}"
        elif result["code"] != 0 and (not lines or not lines[-1].startswith("error: ")):
            problem = "last stderr line is not the error"
        elif sum(line.startswith("error:") for line in lines) > 1:
            problem = "more than one error line"
        elif tree_digest(src) != digest:
            problem = "input modified"
        if problem:
            failures.append(f"{problem}: {' '.join(args)}\n    {err[-400:]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases broke the CLI contract:\n" + "\n".join(failures)


def collect(strategy, build, n: int = EXAMPLES):
    """Draws ``n`` derandomized examples of ``strategy``; ``build(i, example)`` turns one into cases."""
    cases: list[tuple[list[str], Path]] = []

    @settings(
        derandomize=True,
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(example):
        cases.extend(build(len(cases), example))

    draw()
    return cases


@pytest.fixture(scope="module")
def good(tmp_path_factory, hf_preset):
    root = tmp_path_factory.mktemp("fuzz-good")
    hf = hf_preset("tiny")
    hf_to_megatron(hf, root / "meg", tp=2, pp=2)
    hf_to_megatron(hf, root / "dist", fmt="torch_dist")
    return {"hf": hf, "meg": root / "meg", "dist": root / "dist"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _hf_commands(case: Path, tmp: Path, i: int) -> list[tuple[list[str], Path]]:
    return [
        (["inspect", str(case)], case),
        (["hf-to-megatron", str(case), str(tmp / f"out{i}"), "--tp", "2"], case),
        (["push", str(case), "org/repo", "--dry-run"], case),
    ]


def _meg_commands(case: Path, tmp: Path, i: int) -> list[tuple[list[str], Path]]:
    return [
        (["inspect", str(case)], case),
        (["megatron-to-hf", str(case), str(tmp / f"out{i}")], case),
    ]


# ------------------------------------------------------------------------------------------ HF side


def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, header: dict, body: bytes, length_delta: int = 0) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", max(0, len(blob) + length_delta)) + blob + body)


HEADER_MUTATIONS = st.tuples(
    st.sampled_from(["shape", "dim", "dtype", "offsets", "drop", "add", "rename", "length", "metadata"]),
    st.integers(0, 10**6),
    SIZES,
    JSON_VALUES,
)


def test_fuzz_safetensors_header(good, tmp_path):
    def build(i, mutation):
        kind, pick, size, value = mutation
        case = _copy(good["hf"], tmp_path / f"c{i}")
        shards = sorted(case.glob("*.safetensors"))
        shard = shards[pick % len(shards)]
        header, body = _read_header(shard)
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[pick % len(keys)]
        delta = 0
        if kind == "shape":
            header[key]["shape"] = value
        elif kind == "dim":
            shape = header[key]["shape"]
            if shape:
                shape[pick % len(shape)] = size
            else:
                shape.append(size)
        elif kind == "dtype":
            header[key]["dtype"] = value if isinstance(value, str) and value else "I32"
        elif kind == "offsets":
            header[key]["data_offsets"] = [size, size] if pick % 2 else [0, size]
        elif kind == "drop":
            del header[key]
        elif kind == "add":
            header[f"model.layers.{size}.extra.weight"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        elif kind == "rename":
            header[key.replace("layers.", f"layers.{size}", 1) if "layers." in key else key + "x"] = header.pop(key)
        elif kind == "length":
            delta = size
        else:
            header["__metadata__"] = value
        _write_header(shard, header, body, delta)
        return _hf_commands(case, tmp_path, i)

    run_batch(tmp_path, collect(HEADER_MUTATIONS, build))


CONFIG_FIELDS = [
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "mamba_d_ssm",
    "mamba_n_heads",
    "mamba_d_head",
    "mamba_n_groups",
    "mamba_d_state",
    "mamba_d_conv",
    "mamba_expand",
    "mamba_chunk_size",
    "tie_word_embeddings",
    "model_type",
    "rope_parameters",
    "mlp_multipliers",
    "ssm_multipliers",
    "key_multiplier",
    "dtype",
    "quantization_config",
    "architectures",
]


def test_fuzz_config_json(good, tmp_path):
    mutation = st.tuples(st.sampled_from(CONFIG_FIELDS), st.one_of(SIZES, JSON_VALUES), st.booleans())

    def build(i, example):
        field, value, delete = example
        case = _copy(good["hf"], tmp_path / f"c{i}")
        config = json.loads((case / "config.json").read_text())
        if delete:
            config.pop(field, None)
        else:
            config[field] = value
        (case / "config.json").write_text(json.dumps(config))
        return _hf_commands(case, tmp_path, i)

    run_batch(tmp_path, collect(mutation, build))


def test_fuzz_index(good, tmp_path):
    mutation = st.tuples(
        st.sampled_from(["drop", "remap", "add", "value", "metadata", "root"]), st.integers(0, 10**6), JSON_VALUES
    )

    def build(i, example):
        kind, pick, value = example
        case = _copy(good["hf"], tmp_path / f"c{i}")
        index = json.loads((case / "model.safetensors.index.json").read_text())
        weight_map = index["weight_map"]
        keys = sorted(weight_map)
        key = keys[pick % len(keys)]
        files = sorted(set(weight_map.values()))
        if kind == "drop":
            del weight_map[key]
        elif kind == "remap":
            weight_map[key] = files[(files.index(weight_map[key]) + 1) % len(files)]
        elif kind == "add":
            weight_map[f"model.layers.{pick}.x.weight"] = files[0]
        elif kind == "value":
            weight_map[key] = value
        elif kind == "metadata":
            index["metadata"] = value
        else:
            index = value
        (case / "model.safetensors.index.json").write_text(json.dumps(index))
        return _hf_commands(case, tmp_path, i)

    run_batch(tmp_path, collect(mutation, build))


# ------------------------------------------------------------------------------------ Megatron side

TRACKER = "latest_checkpointed_iteration.txt"


def test_fuzz_tracker(good, tmp_path):
    text = st.one_of(
        st.text(max_size=12),
        st.sampled_from(["release", "0", "1", "-1", "10000000", "9" * 5000, "release\n", " 1 ", "iter_0000001"]),
    )

    def build(i, value):
        case = _copy(good["meg"], tmp_path / f"c{i}")
        (case / TRACKER).write_text(value)
        return _meg_commands(case, tmp_path, i)

    run_batch(tmp_path, collect(text, build))


ARGS_FIELDS = [
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "padded_vocab_size",
    "mamba_num_heads",
    "mamba_head_dim",
    "mamba_num_groups",
    "mamba_state_dim",
    "hybrid_override_pattern",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "params_dtype",
    "make_vocab_size_divisible_by",
    "untie_embeddings_and_output_weights",
    "model_type",
    "mlp_multipliers",
]


def test_fuzz_legacy_rank_files(good, tmp_path):
    plain = st.one_of(st.none(), st.booleans(), SIZES, st.text(max_size=6), st.lists(SIZES, max_size=3))
    mutation = st.tuples(
        st.sampled_from(["arg", "del_arg", "no_args", "dtype", "shape", "drop", "add"]),
        st.integers(0, 10**6),
        st.sampled_from(ARGS_FIELDS),
        plain,
    )

    def build(i, example):
        kind, pick, field, value = example
        case = _copy(good["meg"], tmp_path / f"c{i}")
        files = sorted(case.rglob("model_optim_rng.pt"))
        path = files[pick % len(files)]
        state = torch.load(path, weights_only=False)  # our own file, written by the fixture
        model = state["model"]
        keys = sorted(k for k, v in model.items() if isinstance(v, torch.Tensor))
        key = keys[pick % len(keys)]
        if kind == "arg":
            setattr(state["args"], field, value)
        elif kind == "del_arg":
            if hasattr(state["args"], field):
                delattr(state["args"], field)
        elif kind == "no_args":
            del state["args"]
        elif kind == "dtype":
            model[key] = model[key].to([torch.int32, torch.float64, torch.bool, torch.uint8][pick % 4])
        elif kind == "shape":
            t = model[key]
            model[key] = t.reshape(-1)[: max(0, t.numel() - 1 - pick % 5)].clone()
        elif kind == "drop":
            del model[key]
        else:
            model[f"decoder.layers.{pick % 1000}.extra.weight"] = torch.zeros(2)
        torch.save(state, path)
        return _meg_commands(case, tmp_path, i)

    run_batch(tmp_path, collect(mutation, build))


def test_fuzz_dcp_metadata(good, tmp_path):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    mutation = st.tuples(
        st.sampled_from(["size", "chunk", "drop", "rename", "storage", "offset", "dtype"]),
        st.integers(0, 10**6),
        SIZES,
        st.text(max_size=8),
    )

    def build(i, example):
        kind, pick, size, text = example
        case = _copy(good["dist"], tmp_path / f"c{i}")
        path = next(case.rglob(".metadata"))
        meta = pickle.loads(path.read_bytes())  # our own file, written by the fixture
        sd = meta.state_dict_metadata
        tensors = sorted(k for k, v in sd.items() if isinstance(v, TensorStorageMetadata))
        key = tensors[pick % len(tensors)]
        item = sd[key]
        if kind == "size":
            dims = list(item.size)
            if dims:
                dims[pick % len(dims)] = size
            item.size = torch.Size([max(0, d) for d in dims])
        elif kind == "chunk" and item.chunks:
            chunk = item.chunks[0]
            item.chunks[0] = type(chunk)(offsets=chunk.offsets, sizes=torch.Size([abs(size)] * len(chunk.sizes)))
        elif kind == "drop":
            del sd[key]
        elif kind == "rename":
            sd[key.replace("layers", f"layers{text}", 1) + ("" if "layers" in key else text or "x")] = sd.pop(key)
        elif kind in ("storage", "offset") and meta.storage_data:
            entries = sorted(meta.storage_data, key=repr)
            index = entries[pick % len(entries)]
            info = meta.storage_data[index]
            if kind == "storage":
                meta.storage_data[index] = type(info)(text or "../x", info.offset, info.length)
            else:
                meta.storage_data[index] = type(info)(info.relative_path, abs(size), info.length)
        else:
            item.properties.dtype = [torch.int32, torch.float64, torch.bool][pick % 3]
        path.write_bytes(pickle.dumps(meta))
        return _meg_commands(case, tmp_path, i)

    run_batch(tmp_path, collect(mutation, build))


def test_dcp_storage_offset_error_is_one_clean_line(good, tmp_path):
    case = _copy(good["dist"], tmp_path / "c0")
    path = next(case.rglob(".metadata"))
    meta = pickle.loads(path.read_bytes())
    index = sorted(meta.storage_data, key=repr)[0]
    info = meta.storage_data[index]
    meta.storage_data[index] = type(info)(info.relative_path, 0, info.length)
    path.write_bytes(pickle.dumps(meta))
    run_batch(tmp_path, [(["megatron-to-hf", str(case), str(tmp_path / "out")], case)])
