"""``h1bridge``: a thin click CLI over the ``bridge`` Python API.

Every command prints a short summary (or JSON with ``--json``) and exits with the code of the
error class it hit: 0 ok, 1 verification failed, 2 usage, 3 bad input, 4 output refused,
5 unsupported by Megatron / this tool, 6 internal error (a bug: ``--debug`` shows the traceback),
128+N killed by signal N (SIGINT, SIGTERM, SIGHUP: partial output removed). Errors are one line,
never a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import gc
import json
import math
import os
import re
import shlex
import signal
import sys
import traceback
from inspect import signature as inspect_signature
from pathlib import Path

import click

from bridge import api
from bridge.engine.config import dtype_name
from bridge.errors import BridgeError, add_secret, redact, sanitize
from bridge.plumbing import distributed, signals

PathArg = click.Path(path_type=Path)


def _emit(result: dict, as_json: bool, text: str) -> None:
    if distributed.current().rank != 0:  # under torchrun process 0 reports for all
        return
    click.echo(json.dumps(result, indent=2, default=str) if as_json else text)


_BRIDGE = Path(__file__).resolve().parent / "bridge"
_PATH_LOCALS = ("path", "file", "filename", "where")


def _input_file(e: BaseException) -> str | None:
    """The user's file being read when ``e`` (undecodable text, nesting too deep, an integer too long,
    no memory left) was raised: the innermost frame of ours that holds an existing file in a local
    named like one (``path``, ``where`` ...); None when no frame says."""
    if not (
        isinstance(e, (UnicodeError, RecursionError, MemoryError))
        or (isinstance(e, ValueError) and "integer string conversion" in str(e))
    ):
        return None
    frames = [frame for frame, _ in traceback.walk_tb(e.__traceback__)]
    for frame in reversed(frames):
        if not frame.f_code.co_filename.startswith(str(_BRIDGE)):
            continue
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, Path)) and value and os.path.isfile(value):
                return str(value)
    return None


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get("H1BRIDGE_DEBUG", "").lower() in ("1", "true", "yes", "on")


def _fail(e: BaseException):
    """Ends the process for an exception that reached the CLI: one line, the documented exit code."""
    signum = signals.received()
    if isinstance(e, KeyboardInterrupt) or signum is not None:
        # a signal wrapped on its way up (torch.save re-raises it as a RuntimeError) is still the signal
        signum = getattr(e, "signum", None) or signum or signal.SIGINT
        click.echo(f"interrupted by {signals.name(signum)}; no partial output was left", err=True)
        sys.exit(128 + signum)
    if isinstance(e, BridgeError):
        click.echo(f"error: {sanitize(str(e), limit=2000)}", err=True)
        sys.exit(e.exit_code)
    if isinstance(e, OSError) and e.errno == errno.EPIPE:  # `h1bridge inspect x | head -1`: as a shell reports it
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    what = f"{type(e).__name__}: {sanitize(str(e))}"
    source = _input_file(e)
    if source is not None:
        click.echo(f"error: {sanitize(source, limit=1000)}: cannot be read ({what})", err=True)
        sys.exit(3)
    if _debug():
        click.echo(redact("".join(traceback.format_exception(e))).rstrip(), err=True)
    else:
        click.echo(f"error: internal: {sanitize(what)} (rerun with --debug)", err=True)
    sys.exit(6)


_CLICK_EXITS = (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)


@contextlib.contextmanager
def _boundary():
    """Every exception other than click's own (usage errors, --help, --version) ends in ``_fail``."""
    try:
        yield
    except _CLICK_EXITS:
        raise
    except (Exception, KeyboardInterrupt) as e:
        _fail(e)


def _friendly(fn):
    """Turns BridgeError into a one-line message and its exit code (and everything else, see ``_fail``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _boundary():
            return fn(*args, **kwargs)

    return wrapper


class _Main(click.Group):
    """The top-level group: what escapes a command (or the group's own set-up, or option callbacks)
    goes through ``_fail`` too, so no traceback and no exit 1 (click's "Aborted!") ever reach the user."""

    def invoke(self, ctx: click.Context):
        with _boundary():
            result = super().invoke(ctx)
            signals.check()  # a signal whose exception was swallowed on the way still ends in 128+N
            return result


def _summary_text(s: dict) -> str:
    what = (
        f"{s['direction']}: {s['source']} -> {s['destination']}\n"
        f"  format={s['format']} TP={s['tp']} PP={s['pp']} layout={s['layout']} dtype={s['dtype']}"
    )
    if s.get("dry_run"):
        return _plan_text(s["plan"], what)
    size = s["bytes_written"] / 2**20
    spread = f" by {s['processes']} processes" if s.get("processes", 1) > 1 else ""
    return f"{what}\n  {s['tensors']} tensors, {len(s['files'])} files, {size:.1f} MiB in {s['seconds']:.2f}s{spread}"


def _plan_text(plan: dict, what: str) -> str:
    """A dry run: what would be written, file by file, and whether the disk and memory suffice."""
    gib = 2**30
    lines = [f"dry run, nothing written: {what}"]
    lines += [f"  {size:>15,d}  {name}" for name, size in plan["files"].items()]
    verdict = "fits" if plan["fits"] else "DOES NOT FIT"
    lines += [
        f"  {len(plan['files'])} files, {plan['bytes'] / gib:.2f} GiB; "
        f"{plan['disk_free'] / gib:.2f} GiB free where DST goes: {verdict}",
        f"  estimated peak RSS {plan['peak_rss_estimate'] / gib:.2f} GiB",
    ]
    return "\n".join(lines)


def _parse_override(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep:
        raise click.BadParameter(f"{text!r}: expected FIELD=VALUE", param_hint="--set")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


_POSITIVE = click.IntRange(min=1)
_NON_NEGATIVE = click.IntRange(min=0)


class _Tolerance(click.FloatRange):
    """A float >= 0; NaN (which every comparison, the range check's too, lets through) is refused."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number >= 0.", param, ctx)
        return number


_TOLERANCE = _Tolerance(min=0.0)


def _parse_shard_size(ctx, param, value):
    """--max-shard-size as ``save_pretrained`` takes it: a size with a unit (5GB, 200MB, 1GiB) or a byte
    count, > 0. Anything else is a usage error here rather than a failure after the reading started."""
    from transformers.utils.hub import convert_file_size_to_int

    text = str(value).strip()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise click.BadParameter(f"{value!r}: expected a size > 0 such as 5GB, 200MB, 1GiB or a byte count")
    return size


max_shard_size_option = click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    callback=_parse_shard_size,
    help="Largest safetensors shard (as save_pretrained: 5GB, 200MB, 1GiB or bytes).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress output; the summary still prints.")
force_option = click.option("--force", is_flag=True, help="Replace DST if it exists.")
dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Write nothing: list the files and bytes the output would have, disk needed against free, and the "
    "estimated peak memory. Reads headers and indexes only, no tensor data.",
)


def arithmetic_option(flag: str):
    return click.option(
        flag,
        "arithmetic",
        type=click.Choice(api.BITNET_ARITHMETICS),
        default=api.BITNET_DEFAULT_ARITHMETIC,
        show_default=True,
        help="How latent BitNet weights are ternarized: onebitllms = TII's quantize_to_1bit byte for byte "
        "(bf16 arithmetic, bf16 weight_scale); fp32 = the same formula in fp32 (fp32 weight_scale).",
    )


dtype_option = click.option(
    "--dtype",
    type=click.Choice(api.DTYPE_CHOICES),
    default="keep",
    show_default=True,
    help="Storage dtype of the output tensors (transformers' names bfloat16/float16/float32 work too).",
    callback=lambda ctx, param, value: dtype_name(value),  # one spelling downstream: same bytes (model card)
)


def _shows_progress(as_json: bool, quiet: bool) -> bool:
    """Progress goes to stderr, but --json callers are scripts: neither they nor --quiet get any; under
    torchrun only process 0 shows its own."""
    return not (as_json or quiet) and distributed.current().rank == 0


# The commands that split their work over the processes torchrun starts (README "Scaling out").
SPREAD_COMMANDS = ("hf-to-megatron", "megatron-to-hf", "reshard")


def _spread(fn):
    """Runs the command in the group of processes torchrun started (``distributed.processes``), each
    doing its share; an error in any of them ends all of them. Without torchrun: a plain run."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("dry_run") and _several_processes():
            _usage_error("--dry-run plans the output in one process; run it without torchrun")
        with distributed.processes():
            return fn(*args, **kwargs)

    return wrapper


def _several_processes() -> bool:
    return distributed.launched() and os.environ.get("WORLD_SIZE", "1") != "1"


def _usage_error(message: str):
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _refuse_torchrun(command: str | None) -> None:
    """Only SPREAD_COMMANDS split their work: N processes running another command would each do all of it
    (and race for the same DST)."""
    if command not in SPREAD_COMMANDS and _several_processes():
        _usage_error(
            f"h1bridge {command} runs in one process, started {os.environ['WORLD_SIZE']} times here by torchrun; "
            f"only {', '.join(SPREAD_COMMANDS)} split their work over processes: run it without torchrun"
        )


def _parse_iteration(ctx, param, value):
    if value is None:
        return None
    from bridge.formats.iterations import parse_iteration

    try:
        return parse_iteration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _read_options(fn):
    """--iteration / --hf-config / --hf-reference, handed to the command as one ``options`` value."""

    @functools.wraps(fn)
    def wrapper(*args, iteration, hf_config, hf_reference, **kwargs):
        from bridge.engine.source import ReadOptions

        return fn(*args, options=ReadOptions(iteration, hf_config, hf_reference), **kwargs)

    for decorator in reversed(
        (
            click.option(
                "--iteration",
                callback=_parse_iteration,
                metavar="N",
                help="Read iter_N (or 'release') instead of the newest / tracked iteration.",
            ),
            click.option(
                "--hf-config",
                type=PathArg,
                help="Folder (or Hub id) whose config.json describes the model; overrides the sidecar, args and "
                "run_config.yaml.",
            ),
            click.option(
                "--hf-reference",
                type=PathArg,
                help="HF folder (or Hub id) to take tokenizer, generation config and model card from when the "
                "checkpoint has none.",
            ),
        )
    ):
        wrapper = decorator(wrapper)
    return wrapper


def _hub_sources(*names: str, revision: bool = True):
    """The HF arguments ``names`` (and --hf-config / --hf-reference) may be Hub ids ``org/name``:
    resolved through huggingface_hub to cached snapshots, offline under HF_HUB_OFFLINE. Adds --token
    (else HF_TOKEN or the stored login) and, where ``revision``, --revision of those repos. Goes
    under ``_friendly`` so a failed download is one line."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, token, **kwargs):
            from bridge.hub_source import resolve_hf_source

            rev = kwargs.pop("hub_revision", None)
            add_secret(token)  # never in an error line
            for name in names:
                kwargs[name] = resolve_hf_source(kwargs[name], revision=rev, token=token)
            options = kwargs.get("options")
            if options is not None:
                kwargs["options"] = dataclasses.replace(
                    options,
                    hf_config=options.hf_config and resolve_hf_source(options.hf_config, revision=rev, token=token),
                    hf_reference=options.hf_reference
                    and resolve_hf_source(options.hf_reference, revision=rev, token=token),
                )
            if "token" in inspect_signature(fn).parameters:  # the command uploads too
                kwargs["token"] = token
            return fn(*args, **kwargs)

        wrapper = click.option(
            "--token", envvar=None, metavar="TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`)."
        )(wrapper)
        if revision:
            wrapper = click.option(
                "--revision", "hub_revision", metavar="REV", help="Branch, tag or commit of Hub-id sources."
            )(wrapper)
        return wrapper

    return decorate


def _stack(*decorators):
    """Several click decorators applied as one, in the order listed (the order --help shows)."""

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


_push_options = _stack(
    click.option("--private", is_flag=True, help="Create the repo private (if it does not exist)."),
    click.option("--revision", help="Branch to push to (created from main if missing)."),
    click.option("--commit-message", help="Commit message."),
    click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch."),
)


def _push_report(result) -> tuple[dict, str]:
    plan = result.plan
    info = {
        "repo_id": plan.repo_id,
        "revision": plan.revision,
        "dry_run": result.dry_run,
        "files": [{"path": f.path, "bytes": f.size} for f in plan.files],
        "warnings": plan.warnings,
        "commit_url": result.commit_url,
        "pr_url": result.pr_url,
    }
    lines = [*(f"warning: {w}" for w in plan.warnings), *plan.lines()]
    if result.dry_run:
        lines += ["", "--- model card (README.md) ---", plan.card_text]
    else:
        lines.append(f"pushed: {result.pr_url or result.commit_url}")
    return info, "\n".join(lines)


def _tune_process() -> None:
    """Settings for a process that streams gigabytes through a few large tensors (measured on the
    1.5B shape, see README "Performance"):

    * glibc raises its mmap threshold after large frees, so later tensors come from the heap and
      freed ones stay resident; a fixed 1 MiB threshold hands every tensor back to the OS when it is
      freed (3.2 -> 2.8 GB peak and 21 -> 12 s re-sharding);
    * one torch thread: conversion is copies, memory-bound; idle OpenMP workers spinning took a core
      from the writer thread (torch_dist TP=2: 17.7 -> 14.1 s, user time halved);
    * objects alive after start-up (modules, the table) are moved out of the garbage collector's way.
    """
    import torch

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
    torch.set_num_threads(1)
    gc.freeze()


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="falcon-h1-bridge")
@click.option(
    "--debug",
    is_flag=True,
    envvar="H1BRIDGE_DEBUG",
    help="On an internal error (exit 6) print the traceback instead of one line [env: H1BRIDGE_DEBUG=1].",
)
def main(debug):
    """Exact, streaming Falcon-H1 conversion between Hugging Face and Megatron checkpoints.

    \b
    Examples:
      h1bridge make-tiny tiny-hf
      h1bridge hf-to-megatron tiny-hf tiny-meg --tp 2 --pp 2
      h1bridge megatron-to-hf tiny-meg tiny-hf2
      h1bridge inspect tiny-meg
      h1bridge mappings
    """
    del debug  # read by _fail, through the context
    ctx = click.get_current_context()
    _refuse_torchrun(ctx.invoked_subcommand)
    ctx.call_on_close(signals.install())  # SIGTERM/SIGHUP end a run like Ctrl-C
    _tune_process()


def _parallel_options(tp_names: tuple[str, ...], pp_names: tuple[str, ...]):
    """--tp/--pp plus Megatron-LM's spellings of them (its training arguments; its checkpoint converter's
    --target-* ones), so a command line copied from a Megatron script works as is."""
    return _stack(
        click.option(
            "--tp", *tp_names, "tp", type=_POSITIVE, default=1, show_default=True, help="Tensor-parallel size to write."
        ),
        click.option(
            "--pp",
            *pp_names,
            "pp",
            type=_POSITIVE,
            default=1,
            show_default=True,
            help="Pipeline-parallel size to write.",
        ),
    )


_MEGATRON_TP, _MEGATRON_PP = "--tensor-model-parallel-size", "--pipeline-model-parallel-size"


# SRC, DST and what describes the Megatron checkpoint to write (hf-to-megatron and reshard), after --tp/--pp.
def _target_options(keep_source: bool):
    """What to write: layout, target stack, format, group expansion. For ``reshard`` (``keep_source``)
    each defaults to the source's, so re-sharding changes only what it is told to."""
    kept = " [default: the source's]" if keep_source else ""
    return _stack(
        click.option(
            "--layout",
            type=click.Choice(api.ALL_LAYOUT_CHOICES),
            default=None,
            help="Megatron key layout to write."
            + (kept or " [default: the model family's: bridge for Falcon-H1, te for Llama]"),
        ),
        click.option(
            "--target",
            type=click.Choice(api.TARGET_CHOICES),
            default=None if keep_source else api.DEFAULT_TARGET,
            show_default=not keep_source,
            help='The stack that will load DST: what its loader needs beside the weights (README "Train the '
            'output").' + kept,
        ),
        click.option(
            "--format",
            "fmt",
            type=click.Choice(api.FORMAT_CHOICES),
            default=None,
            help="Megatron checkpoint format: legacy per-rank files or megatron-core torch_dist "
            + (kept or "[default: legacy for megatron-lm, torch_dist for megatron-bridge]."),
        ),
        click.option(
            "--expand-groups/--no-expand-groups" if keep_source else "--expand-groups",
            is_flag=True,
            default=None if keep_source else False,
            help="Replicate Mamba B/C groups when TP exceeds mamba_n_groups (exact without mamba_rms_norm); "
            "collapsed back on export." + kept,
        ),
        dtype_option,
        force_option,
        dry_run_option,
        json_option,
        quiet_option,
    )


@main.command("hf-to-megatron")
@click.argument("src", type=PathArg)
@click.argument("dst", type=PathArg)
@_parallel_options((_MEGATRON_TP,), (_MEGATRON_PP,))
@_target_options(keep_source=False)
@click.option(
    "--vocab-divisible-by",
    "--make-vocab-size-divisible-by",
    "vocab_divisible_by",
    type=_POSITIVE,
    default=128,
    show_default=True,
    help="Megatron make_vocab_size_divisible_by (vocab padded to a multiple of this x TP; megatron-bridge "
    "keeps the vocabulary unpadded when TP divides it).",
)
@click.option(
    "--iteration",
    callback=_parse_iteration,
    metavar="N",
    help="Write iter_N (N >= 1) [default: release for megatron-lm, 1 for megatron-bridge].",
)
@_friendly
@_spread
@_hub_sources("src")
def hf_to_megatron(
    src,
    dst,
    tp,
    pp,
    layout,
    target,
    vocab_divisible_by,
    iteration,
    fmt,
    expand_groups,
    dtype,
    force,
    dry_run,
    as_json,
    quiet,
):
    """Convert an HF Falcon-H1 folder SRC into a Megatron checkpoint DST.

    \b
    Examples:
      h1bridge hf-to-megatron Falcon-H1-7B meg-7b --tp 2 --pp 2 --dtype bf16
      h1bridge hf-to-megatron Falcon-H1-7B meg-7b-dist --tp 2 --format torch_dist
      h1bridge hf-to-megatron Falcon-H1-7B mb-7b --target megatron-bridge --dtype bf16
      h1bridge hf-to-megatron Falcon-H1-7B meg-7b --tensor-model-parallel-size 2 --dtype bfloat16
      h1bridge hf-to-megatron tiiuae/Falcon-H1-0.5B-Instruct meg-0.5b --tp 2   # a Hub id (cached snapshot)
      h1bridge hf-to-megatron Falcon-H1-34B meg-34b --tp 8 --dry-run   # files, bytes, disk and memory needed
    """
    s = api.hf_to_megatron(
        src,
        dst,
        tp=tp,
        pp=pp,
        dtype=dtype,
        force=force,
        divisible_by=vocab_divisible_by,
        layout=layout,
        fmt=fmt,
        expand_groups=expand_groups,
        progress=_shows_progress(as_json, quiet) and not dry_run,
        target=target,
        iteration=iteration,
        dry_run=dry_run,
    ).to_dict()
    _emit(s, as_json, _summary_text(s))


@main.command()
@click.argument("src", type=PathArg)
@click.argument("dst", type=PathArg)
@_parallel_options(
    ("--target-tensor-parallel-size", _MEGATRON_TP),
    # Megatron-LM's tools/checkpoint/convert.py spells it without "model"
    ("--target-pipeline-parallel-size", "--target-pipeline-model-parallel-size", _MEGATRON_PP),
)
@_target_options(keep_source=True)
@_read_options
@_friendly
@_spread
@_hub_sources(revision=False)
def reshard(src, dst, tp, pp, layout, target, fmt, expand_groups, dtype, force, dry_run, as_json, quiet, options):
    """Re-shard a Megatron checkpoint SRC (legacy or torch_dist) to another TP/PP/format/layout, no HF detour.

    \b
    Examples:
      h1bridge reshard meg-tp2 meg-tp4-pp2 --tp 4 --pp 2
      h1bridge reshard meg-tp2 meg-dist --tp 2 --format torch_dist
      h1bridge reshard meg-tp2 meg-tp4 --target-tensor-parallel-size 4
      h1bridge reshard meg-tp2 meg-tp8 --tp 8 --dry-run

    Format, layout, target stack and group expansion stay the source's unless given.
    """
    s = api.reshard(
        src,
        dst,
        tp=tp,
        pp=pp,
        fmt=fmt,
        layout=layout,
        dtype=dtype,
        force=force,
        expand_groups=expand_groups,
        progress=_shows_progress(as_json, quiet) and not dry_run,
        options=options,
        target=target,
        dry_run=dry_run,
    ).to_dict()
    _emit(s, as_json, _summary_text(s))


@main.command("megatron-to-hf")
@click.argument("src", type=PathArg)
@click.argument("dst", type=PathArg)
@max_shard_size_option
@click.option("--push-to", metavar="REPO_ID", help="After converting, upload DST to this Hub repo.")
@_push_options
@click.option("--fold-mup", is_flag=True, help="Fold the µP multipliers into the weights (see `h1bridge mup`).")
@arithmetic_option("--bitnet-arithmetic")
@dtype_option
@_read_options
@force_option
@dry_run_option
@json_option
@quiet_option
@_friendly
@_spread
@_hub_sources(revision=False)
def megatron_to_hf(
    src,
    dst,
    max_shard_size,
    push_to,
    private,
    revision,
    commit_message,
    create_pr,
    fold_mup,
    arithmetic,
    dtype,
    force,
    dry_run,
    as_json,
    quiet,
    options,
    token,
):
    """Convert a Megatron checkpoint SRC (any TP/PP) into an HF folder DST.

    SRC may be the checkpoint root (tracker or latest_train_state.pt) or an iter_* directory, written by
    this tool, Megatron-LM or Megatron-Bridge (legacy or torch_dist; optimizer and RNG state are skipped).

    \b
    Examples:
      h1bridge megatron-to-hf meg-0.5b Falcon-H1-0.5B-ft --dtype bf16
      h1bridge megatron-to-hf mb-run/checkpoints ft-hf --iteration 1000 --hf-reference Falcon-H1-0.5B
      h1bridge megatron-to-hf meg-0.5b Falcon-H1-0.5B-ft --push-to my-org/Falcon-H1-0.5B-ft --private
      h1bridge megatron-to-hf meg-0.5b Falcon-H1-0.5B-ft --dry-run --json   # the plan only

    With --dry-run, --push-to uploads nothing.
    """
    s = api.megatron_to_hf(
        src,
        dst,
        dtype=dtype,
        force=force,
        max_shard_size=max_shard_size,
        progress=_shows_progress(as_json, quiet) and not dry_run,
        fold_mup=fold_mup,
        bitnet_arithmetic=arithmetic,
        options=options,
        dry_run=dry_run,
    ).to_dict()
    text = _summary_text(s)
    if push_to and not dry_run and distributed.current().rank == 0:  # the card with the provenance is in DST already
        result = api.push(
            dst,
            push_to,
            private=private,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            token=token,
        )
        s["push"], push_text = _push_report(result)
        text += "\n" + push_text
    _emit(s, as_json, text)


@main.command()
@click.argument("path", type=PathArg)
@_read_options
@json_option
@_friendly
@_hub_sources("path")
def inspect(path, as_json, options):
    """Detect the format of PATH and print config, TP/PP, dtypes, parameter count and bytes.

    \b
    Example:
      h1bridge inspect meg-0.5b --json
    """
    info = api.inspect_checkpoint(path, options)
    _emit(info, as_json, api.format_inspect(info))


@main.command()
@click.option(
    "--family",
    type=click.Choice(api.FAMILY_CHOICES),
    default="falcon_h1",
    show_default=True,
    help="Model family (HF model_type) whose table to print.",
)
@click.option(
    "--layout", type=click.Choice(api.ALL_LAYOUT_CHOICES), default=None, help="[default: the family's default layout]"
)
@json_option
def mappings(family, layout, as_json):
    """Print a model family's mapping table: Megatron key, HF key(s), TP rule, condition."""
    rows = api.mapping_rows(layout, family)
    if as_json:
        _emit(rows, True, "")
        return
    width = max(len(r["megatron"]) for r in rows)
    for r in rows:
        cond = f"  [if {r['when']}]" if r["when"] else ""
        copies = "".join(f"\n{c:<{width}}  (a copy of the key above)" for c in r["copies"])
        click.echo(f"{r['megatron']:<{width}}  {r['rule']:<26} {', '.join(r['hf'])}{cond}{copies}")


@main.command("make-tiny")
@click.argument("dst", type=PathArg)
@click.option("--preset", type=click.Choice(api.ALL_PRESET_CHOICES), default="tiny", show_default=True)
@click.option("--seed", type=_NON_NEGATIVE, default=0, show_default=True)
@click.option("--full", is_flag=True, help="Released full shape (Falcon-H1 family presets; streamed random weights).")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"]),
    default="fp32",
    show_default=True,
    callback=lambda ctx, param, value: dtype_name(value),
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override a FalconH1Config field (JSON value), e.g. --set mamba_n_groups=2.",
)
@force_option
@json_option
@quiet_option
@_friendly
def make_tiny(dst, preset, seed, full, dtype, overrides, force, as_json, quiet):
    """Write a random Falcon-H1 HF checkpoint DST (no download).

    \b
    Examples:
      h1bridge make-tiny tiny-hf --preset tiny-mup
      h1bridge make-tiny h1-3b --preset 3b --full --dtype bf16 --set mamba_n_groups=2
    """
    fields = dict(_parse_override(o) for o in overrides)
    del quiet  # accepted like every writing command's; make-tiny shows no progress
    cfg = api.make_tiny(
        dst,
        preset,
        seed=seed,
        full=full,
        dtype=dtype,
        force=force,
        **fields,
    )
    info = {"destination": str(dst), "preset": preset, "full": full, "config": cfg.to_diff_dict()}
    _emit(info, as_json, f"wrote {preset}{' (full shape)' if full else ''} {cfg.model_type} model to {dst}")


@main.command()
@click.argument("hf_dir", type=PathArg)
@click.argument("repo_id")
@_push_options
@click.option("--dry-run", is_flag=True, help="Validate and list files, sizes and the card; upload nothing.")
@click.option("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed.")
@json_option
@_friendly
def push(hf_dir, repo_id, private, revision, commit_message, create_pr, dry_run, token, as_json):
    """Validate HF_DIR and upload it to the Hub as REPO_ID, with a generated model card.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. HF_ENDPOINT selects
    another Hub-compatible server.

    \b
    Examples:
      h1bridge push Falcon-H1-0.5B-ft my-org/Falcon-H1-0.5B-ft --private --dry-run
      h1bridge push Falcon-H1-0.5B-ft my-org/Falcon-H1-0.5B-ft --revision megatron-step-1000
    """
    add_secret(token)  # never in an error line
    _check_push_order(hf_dir, repo_id)
    result = api.push(
        hf_dir,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        dry_run=dry_run,
        token=token,
    )
    info, text = _push_report(result)
    _emit(info, as_json, text)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check_push_order(hf_dir: Path, repo_id: str) -> None:
    """``push org/name ./folder`` (``hf upload`` takes the repo id first) would fail later on a missing
    folder; say so at once, with the command in the right order."""
    if hf_dir.exists() or not _HUB_ID.fullmatch(str(hf_dir)) or not Path(repo_id).is_dir():
        return
    swapped = shlex.join(["h1bridge", "push", repo_id, str(hf_dir)])
    click.echo(
        f"error: {hf_dir} is not a folder but looks like a Hub repo id, and {repo_id} is a folder; "
        f"the folder comes first, did you mean: {swapped}",
        err=True,
    )
    sys.exit(2)


def _fold_text(r: dict) -> str:
    if r["dry_run"]:
        return _plan_text(r["plan"], f"mup {r['direction']}: {r['source']} -> {r['destination']} dtype={r['dtype']}")
    after = (
        "multipliers now 1.0, originals in config.json mup_folded"
        if r["direction"] == "fold"
        else "multipliers restored from mup_folded"
    )
    lines = [
        f"mup {r['direction']}: {r['source']} -> {r['destination']}",
        f"  dtype={r['dtype']}, {r['scaled']} of {r['tensors']} tensors scaled; {after}",
        f"  {r['bytes_written'] / 2**20:.1f} MiB in {r['seconds']:.2f}s",
    ]
    if r["rounding"]:
        key, worst = max(r["rounding"].items(), key=lambda kv: kv[1]["max_rel"])
        lines.append(f"  storage rounding: max rel error {worst['max_rel']:.2e} ({key}); see --json per tensor")
    return "\n".join(lines)


@main.group()
def mup():
    """Fold Falcon-H1 µP multipliers into the weights, or undo that (HF -> HF).

    The default everywhere else is to keep the multipliers in config.json, as transformers and
    Megatron-Bridge apply them at run time. Fold for runtimes that ignore them (GGUF-style
    exporters, custom kernels); unfold to get the trainable µP form back.

    \b
    Examples:
      h1bridge mup fold tiny-hf tiny-folded --dtype bf16
      h1bridge mup unfold tiny-folded tiny-mup --json
    """


def _mup_options(fn):
    for option in reversed(
        [
            click.argument("src", type=PathArg),
            click.argument("dst", type=PathArg),
            max_shard_size_option,
            dtype_option,
            force_option,
            dry_run_option,
            json_option,
            quiet_option,
        ]
    ):
        fn = option(fn)
    return fn


def _mup_run(run, src, dst, max_shard_size, dtype, force, dry_run, as_json, quiet) -> None:
    r = run(
        src,
        dst,
        dtype=dtype,
        force=force,
        max_shard_size=max_shard_size,
        progress=_shows_progress(as_json, quiet),
        dry_run=dry_run,
    ).to_dict()
    _emit(r, as_json, _fold_text(r))


@mup.command("fold")
@_mup_options
@_friendly
def mup_fold(src, dst, max_shard_size, dtype, force, dry_run, as_json, quiet):
    """Fold the µP multipliers of HF folder SRC into its weights, writing DST.

    Each factor is multiplied into the linear map it scales (in fp32, stored as --dtype) and its
    config field becomes 1.0; the original entries are kept under "mup_folded" for `mup unfold`.

    \b
    Example:
      h1bridge mup fold Falcon-H1-0.5B Falcon-H1-0.5B-folded --dtype bf16
    """
    _mup_run(api.fold_mup, src, dst, max_shard_size, dtype, force, dry_run, as_json, quiet)


@mup.command("unfold")
@_mup_options
@_friendly
def mup_unfold(src, dst, max_shard_size, dtype, force, dry_run, as_json, quiet):
    """Undo `mup fold`: divide the recorded factors out of SRC's weights and restore its config, writing DST.

    \b
    Example:
      h1bridge mup unfold Falcon-H1-0.5B-folded Falcon-H1-0.5B-mup
    """
    _mup_run(api.unfold_mup, src, dst, max_shard_size, dtype, force, dry_run, as_json, quiet)


def _report_exit(report, as_json: bool) -> None:
    """Prints a verify/parity report; exit code 1 (as VerificationFailed) when it did not pass."""
    _emit(report.to_dict(), as_json, report.format())
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("a", type=PathArg)
@click.argument("b", type=PathArg)
@click.option(
    "--atol", type=_TOLERANCE, default=0.0, show_default=True, help="Largest |Δ| per element still accepted (0: exact)."
)
@_read_options
@json_option
@quiet_option
@_friendly
@_hub_sources("a", "b")
def verify(a, b, atol, as_json, quiet, options):
    """Compare checkpoints A and B tensor by tensor (in HF key space) and config field by field.

    A and B may each be an HF folder or a Megatron checkpoint of any TP/PP. Exits 1 when a tensor,
    a key or a config field (µP multipliers included) differs.

    \b
    Examples:
      h1bridge verify Falcon-H1-0.5B meg-0.5b
      h1bridge verify meg-tp2 meg-tp4 --json
    """
    _report_exit(api.verify(a, b, atol=atol, options=options, progress=_shows_progress(as_json, quiet)), as_json)


@main.command()
@click.argument("hf_dir", type=PathArg)
@click.argument("megatron_dir", type=PathArg)
@click.option("--tokens", type=_POSITIVE, default=32, show_default=True, help="Tokens per random sequence.")
@click.option("--seed", type=_NON_NEGATIVE, default=0, show_default=True, help="Seed of the random token ids.")
@click.option("--batch", type=_POSITIVE, default=2, show_default=True, help="Random sequences per batch.")
@click.option(
    "--atol", type=_TOLERANCE, default=1e-5, show_default=True, help="Largest max|Δ logits| still accepted (fp32)."
)
@_read_options
@json_option
@quiet_option
@_friendly
@_hub_sources("hf_dir")
def parity(hf_dir, megatron_dir, tokens, seed, batch, atol, as_json, quiet, options):
    """Logits of transformers on HF_DIR vs an independent forward on MEGATRON_DIR's TP shards.

    The Megatron side runs each TP rank on its own shard (legacy or torch_dist; fp32, CPU) and combines ranks as
    Megatron's collectives would. Exits 1 unless max|Δ| <= --atol and top-1 agreement is 100%.

    \b
    Example:
      h1bridge parity Falcon-H1-0.5B meg-0.5b --tokens 64 --json
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # loading bars and kernel-fallback notes would bury the report
    hf_logging.disable_progress_bar()
    report = api.parity(
        hf_dir,
        megatron_dir,
        tokens=tokens,
        seed=seed,
        batch=batch,
        atol=atol,
        options=options,
        progress=_shows_progress(as_json, quiet),
    )
    _report_exit(report, as_json)


@main.group()
def bitnet():
    """BitNet b1.58 ternary weights: transformers' packed HF format <-> plain weights (Falcon-H1, Llama).

    \b
    Examples:
      h1bridge bitnet pack Falcon-H1-ft Falcon-H1-ft-1.58bit
      h1bridge bitnet unpack Falcon-H1-ft-1.58bit Falcon-H1-ft-bf16 --dtype bf16
    """


def _bitnet_text(r: dict) -> str:
    if r["dry_run"]:
        return _plan_text(r["plan"], f"bitnet {r['direction']}: {r['source']} -> {r['destination']}")
    rules = ", ".join(f"{n} {rule}" for rule, n in sorted(r["quantized"].items()))
    arithmetic = f" arithmetic={r['arithmetic']}" if r["arithmetic"] else ""
    return (
        f"bitnet {r['direction']}: {r['source']} -> {r['destination']}\n"
        f"  linear_class={r['linear_class']} dtype={r['dtype']}{arithmetic}\n"
        f"  {r['linears']} BitNet linears{f' ({rules})' if rules else ''}, {r['tensors']} tensors, "
        f"{r['bytes_written'] / 2**20:.1f} MiB in {r['seconds']:.2f}s"
    )


@bitnet.command("pack")
@click.argument("src", type=PathArg)
@click.argument("dst", type=PathArg)
@click.option(
    "--linear-class",
    type=click.Choice(api.BITNET_LINEAR_CLASSES),
    default=None,
    help="transformers layer: bitlinear stores weight_scale = 1/mean|W|, autobitlinear mean|W| "
    "[default: the one an unpacked SRC records, else bitlinear].",
)
@arithmetic_option("--arithmetic")
@dtype_option
@force_option
@dry_run_option
@json_option
@quiet_option
@_friendly
def bitnet_pack(src, dst, linear_class, arithmetic, dtype, force, dry_run, as_json, quiet):
    """Quantize the BitNet linears of the HF folder SRC to ternary and write the packed HF folder DST.

    Latent weights get absmean over each whole tensor (by default exactly as onebitllms'
    quantize_to_1bit); weights from `bitnet unpack` (or from a packed-origin Megatron checkpoint) are
    packed back bit for bit. --dtype applies to the unquantized tensors.

    \b
    Example:
      h1bridge bitnet pack Falcon-H1-ft Falcon-H1-ft-1.58bit --linear-class autobitlinear
    """
    r = api.pack_checkpoint(
        src,
        dst,
        linear_class=linear_class,
        arithmetic=arithmetic,
        dtype=dtype,
        force=force,
        progress=_shows_progress(as_json, quiet),
        dry_run=dry_run,
    ).to_dict()
    _emit(r, as_json, _bitnet_text(r))


@bitnet.command("unpack")
@click.argument("src", type=PathArg)
@click.argument("dst", type=PathArg)
@dtype_option
@force_option
@dry_run_option
@json_option
@quiet_option
@_friendly
def bitnet_unpack(src, dst, dtype, force, dry_run, as_json, quiet):
    """Write the packed HF folder SRC as plain weights (ternary × scale, in --dtype) to DST.

    DST has no quantization_config; config.json records the exact scales, so `bitnet pack` gives
    SRC back bit for bit.

    \b
    Example:
      h1bridge bitnet unpack Falcon-H1-ft-1.58bit Falcon-H1-ft-bf16 --dtype bf16
    """
    r = api.unpack_checkpoint(
        src, dst, dtype=dtype, force=force, progress=_shows_progress(as_json, quiet), dry_run=dry_run
    ).to_dict()
    _emit(r, as_json, _bitnet_text(r))


if __name__ == "__main__":
    main()
