"""The ``streamconv`` command line.

Every subcommand is a function ``cmd_<name>(args) -> int``; errors a user can act on are
``StreamconvError`` and print one line; anything else prints a traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys

# numpy's OpenBLAS starts a thread per CPU when numpy is imported, and they spin for a while, costing CPU time a
# conversion needs (docs/benchmarks.md). streamconv never multiplies matrices with numpy (torch has its own BLAS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from streamconv import __version__  # noqa: E402
from streamconv.runtime import interrupt
from streamconv.errors import EXIT_INTERNAL, EXIT_IO, EXIT_USAGE, StreamconvError, UsageError, output_error, printable  # noqa: E402

# What an interrupted command leaves behind, per command (printed after "error: interrupted by SIGINT;").
INTERRUPT_HINTS = {
    "hf2mcore": "the output folder is incomplete and is not a loadable checkpoint (no .metadata, no tracker file); "
                "run the same command again to resume",
    "mcore2hf": "the output folder is incomplete (no index, .streamconv-mcore2hf.json still there); run the same "
                "command again to resume",
}


def engine_workers() -> int:
    """Threads per process: the CPUs this process may use, shared by the processes a launcher started on
    this host (``LOCAL_WORLD_SIZE``)."""
    import os

    from streamconv.engine.runner import default_workers

    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)) if os.environ.get("WORLD_SIZE") else 1
    except ValueError:
        local = 1
    return max(1, default_workers() // local)


@contextlib.contextmanager
def joined():
    """The distributed job this process is part of (``dist.Job``) under a launcher, else None."""
    from streamconv.runtime import dist

    if not dist.launched():
        yield None
        return
    job = dist.Job.start()
    try:
        yield job
    finally:
        job.close()


def _count(flag: str, what: str):
    """An argparse type: a whole number of ``what`` from 1 to 256 (``flag`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of {what}: {text!r}") from None
        if not 1 <= n <= 256:
            raise argparse.ArgumentTypeError(f"{flag} {n}: choose 1 to 256 {what}")
        return n

    return parse


_workers = _count("--workers", "threads")
_connections = _count("--connections", "connections")


def _size(text: str) -> int:
    from streamconv.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout at the end")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=_size, default="2GiB",
                   help="bound on the bytes the engine holds in flight (default 2GiB)")
    p.add_argument("--workers", type=_workers, default=None,
                   help="threads that read, convert and write (default: the CPUs this process may use, at most 8)")
    p.add_argument("--device", default="cpu", help="where transforms run: cpu (default) or cuda")


# Each subcommand's --help: what it does, examples (exit codes are common to all: EXIT_CODES).
HELPS = {
    'hf2mcore': (
        'convert a Hugging Face safetensors checkpoint to a Megatron-Core torch_dist checkpoint, streaming, '
        'under --max-memory; re-run the same command to resume after a kill',
        ['streamconv hf2mcore --hf-model nvidia/Llama-3_3-Nemotron-Super-49B-v1_5 --megatron-path ./super-mcore',
         'streamconv hf2mcore --hf-model ./model --megatron-path ./out --dtype bf16 --max-memory 4GiB',
         'torchrun --standalone --nproc-per-node 4 -m streamconv hf2mcore --hf-model ./model --megatron-path ./out']),
    'verify': (
        'check, streaming, that every tensor of a converted checkpoint is bit-identical to what the mapping '
        'makes of its Hugging Face source',
        ['streamconv verify --hf-model ./model --megatron-path ./out',
         'streamconv verify --hf-model ./model --megatron-path ./out/iter_0000000 --json']),
    'mcore2hf': (
        'export a Megatron-Core torch_dist checkpoint (a conversion, or what training saved) to Hugging Face '
        'safetensors shards, streaming; re-run the same command to resume',
        ['streamconv mcore2hf --megatron-path ./out --hf-path ./back',
         'streamconv mcore2hf --megatron-path ./run/checkpoints/iter_0000500 --hf-path ./trained-hf --dtype bf16']),
    'generate': (
        'build the real megatron-core model a checkpoint describes, load it at default strictness and decode '
        'greedily from a prompt',
        ["streamconv generate --megatron-path ./out --prompt 'What is artificial intelligence?' --max-new-tokens 100",
         "streamconv generate --megatron-path ./out --prompt 'Hi' --compare-hf ./model",
         "torchrun --nproc-per-node 2 -m streamconv generate --megatron-path ./out --prompt 'Hi' --tp 2"]),
    'plan': (
        'the conversion plan from config.json alone (no weights read): output tensors, chunks, files, the '
        'memory each layer needs',
        ['streamconv plan --hf-model nvidia/Llama-3_1-Nemotron-Ultra-253B-v1 --layers',
         'streamconv plan --hf-model ./model --max-memory 512MiB --json']),
    'inspect': (
        "list a checkpoint's tensors, totals, architecture and whether it converts, from headers and metadata "
        'only',
        ['streamconv inspect ./model',
         'streamconv inspect ./out --json']),
    'demo': (
        'generate a tiny Nemotron-shaped checkpoint, convert it, load it with megatron-core and compare '
        'logits with a reference',
        ['streamconv demo', 'streamconv demo --workdir ./demo-out --overwrite']),
}
EXIT_CODES = ("exit codes: 0 ok, 1 internal error (a bug: --debug shows it), 2 usage, 3 bad input, 4 output or I/O "
              "(disk full, folder locked or not empty), 5 verify/compare mismatch, 130/143 interrupted (SIGINT/SIGTERM)")


def _helps(name: str) -> dict:
    """``add_parser`` keywords for subcommand ``name``: its description, and an epilog of examples and exit codes."""
    description, examples = HELPS[name]
    epilog = "examples:\n" + "".join(f"  {e}\n" for e in examples) + "\n" + EXIT_CODES
    return {"description": description, "epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamconv",
        description="Streaming, memory-bounded converter between Hugging Face safetensors and "
                    "Megatron-Core torch_dist checkpoints (Llama-Nemotron family).",
    )
    parser.add_argument("--version", action="version", version=f"streamconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(_subparsers=sub)
    _add_hf2mcore(sub)
    _add_verify(sub)
    _add_mcore2hf(sub)
    _add_generate(sub)
    _add_plan(sub)
    _add_inspect(sub)
    _add_demo(sub)
    return parser


def _add_hf2mcore(sub) -> None:
    p = sub.add_parser("hf2mcore", **_helps("hf2mcore"), aliases=["import"],
                       help="convert a HF safetensors checkpoint to Megatron-Core torch_dist (alias: import)")
    p.add_argument("--hf-model", required=True,
                   help="HF model folder, or hub repo id (owner/name, owner/name@revision): its weights are read "
                        "over HTTP range requests, never downloaded (unless all in the local cache)")
    p.add_argument("--megatron-path", required=True, help="output folder (gets iter_0000000/ and the tracker file)")
    p.add_argument("--revision", default=None,
                   help="a hub id's branch, tag or commit (default main); pinned to its commit at planning")
    p.add_argument("--connections", type=_connections, default=16,
                   help="a hub id: range requests in flight (default 16), apart from --workers")
    p.add_argument("--download-first", action="store_true",
                   help="a hub id: download the whole model into the Hugging Face cache first, then convert it "
                        "from there (twice the disk; the streaming default needs none)")
    p.add_argument("--dtype", "--torch-dtype", dest="dtype", default=None,
                   help="output dtype: bf16, fp16 or fp32 (also spelled bfloat16, float16, float32), or auto (default: keep each tensor's "
                        "source dtype)")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty output folder and start over")
    p.add_argument("--allow-unused", action="store_true",
                   help="leave out tensors the mapping does not use (--json lists them under left_out)")
    p.add_argument("--drop-mtp", action="store_true",
                   help="Nemotron-H: leave out the multi-token-prediction layers (mtp.*; default: converted for "
                        "megatron-core 0.17+'s HybridModel; --json lists them under left_out)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for Megatron-Bridge compatibility; streamconv never runs remote code")
    p.add_argument("--no-staging", action="store_true",
                   help="journal whole .distcp files only, not each chunk: a re-run redoes the file a kill "
                        "interrupted (the output is the same)")
    p.add_argument("--recheck", action="store_true",
                   help="when resuming, first read back every chunk kept from the killed run (redoing any whose "
                        "bytes differ from the CRC-32 journaled then), then read its source again and compare "
                        "(refusing a source changed behind the file system's back); costs a read of the kept "
                        "part of the output and of the input")
    p.add_argument("--keep-staging", action="store_true",
                   help="also write a zarr v3 view of the model (<megatron-path>/.streamconv/staging.zarr), in "
                        "megatron layout, readable with zarr/xarray/tensorstore (one more write per byte)")
    p.add_argument("--distcp-size", type=_size, default="512MiB",
                   help="target size of each .distcp file (default 512MiB; each --workers thread writes its own "
                        "file, and a resumed run re-checks the unfinished ones)")
    _add_engine(p)
    _add_common(p)
    p.set_defaults(func=cmd_hf2mcore, command="hf2mcore")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", **_helps("verify"), help="check, bit for bit, that every tensor of a torch_dist checkpoint equals "
                                      "its HF source under the mapping")
    p.add_argument("--hf-model", required=True,
                   help="the HF model folder (or hub repo id, owner/name[@revision]: read over HTTP) it was converted from")
    p.add_argument("--revision", default=None, help="a hub id's branch, tag or commit (default main)")
    p.add_argument("--megatron-path", required=True,
                   help="the converted output: a folder with latest_checkpointed_iteration.txt, or the checkpoint "
                        "folder itself (holding .metadata)")
    _add_engine(p)
    _add_common(p)
    p.set_defaults(func=cmd_verify)


def _add_mcore2hf(sub) -> None:
    p = sub.add_parser("mcore2hf", **_helps("mcore2hf"), aliases=["export"],
                       help="export a Megatron-Core torch_dist checkpoint to HF safetensors (alias: export)")
    p.add_argument("--megatron-path", required=True,
                   help="checkpoint folder (holding .metadata), an iter_*/release folder, or their parent with "
                        "latest_checkpointed_iteration.txt")
    p.add_argument("--hf-path", required=True, help="output folder (safetensors shards, index, config.json)")
    p.add_argument("--hf-config", "--hf-model", dest="hf_config", default=None,
                   help="HF model folder, config.json or hub id describing the model (default: the checkpoint's "
                        "run_config.yaml); tokenizer/generation files are copied from a folder. --hf-model is "
                        "Megatron-Bridge's spelling")
    p.add_argument("--dtype", "--torch-dtype", dest="dtype", default=None,
                   help="output dtype: bf16, fp16 or fp32 (also spelled bfloat16, float16, float32), or auto (default: keep each tensor's "
                        "stored dtype)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for Megatron-Bridge compatibility; streamconv never runs remote code")
    p.add_argument("--not-strict", action="store_true",
                   help="leave out model tensors the mapping does not know instead of refusing (Megatron-Bridge's "
                        "flag; the summary lists them)")
    p.add_argument("--recheck", action="store_true",
                   help="when resuming, first read back every chunk kept from the killed run (writing again any "
                        "whose bytes differ from the CRC-32 journaled then), then read its source again and compare "
                        "(refusing a checkpoint changed behind the file system's back)")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest safetensors shard, as save_pretrained reads it (default 5GB = 5*10^9 bytes)")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty output folder and start over")
    _add_engine(p)
    _add_common(p)
    p.set_defaults(func=cmd_mcore2hf, command="mcore2hf")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", **_helps("generate"), help="run a converted checkpoint: real megatron-core model, greedy decoding "
                                        "(the upstream page's third step)")
    p.add_argument("--megatron-path", "--megatron_model_path", dest="megatron_path", required=True,
                   help="checkpoint folder (holding .metadata), an iter_*/release folder, or their parent "
                        "(--megatron_model_path: Megatron-Bridge's spelling)")
    p.add_argument("--hf-model", "--hf_model_path", dest="hf_model", default=None,
                   help="HF model folder or hub id for the tokenizer (default: the checkpoint's tokenizer/ folder) and, "
                        "if the checkpoint does not describe itself, the config")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=100,
                   help="tokens to generate (default 100)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default=None,
                   help="bf16, fp16 or fp32 (also spelled bfloat16, float16, float32) (default: fp32 on the CPU, the "
                        "checkpoint's dtype on a GPU)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks, under torchrun --nproc-per-node N (default 1)")
    p.add_argument("--max-memory", type=_size, default=None,
                   help="refuse a model bigger than this per process (default: the memory free now)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for Megatron-Bridge compatibility; streamconv never runs remote code")
    p.add_argument("--compare-hf", default=None, metavar="HF_FOLDER",
                   help="also run the HF model (transformers; the reference forward for DeciLM) and compare greedy "
                        "tokens and first-step logits (exit 5 if the tokens differ)")
    _add_common(p)
    p.set_defaults(func=cmd_generate, command="generate")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", **_helps("plan"), help="print the conversion plan without reading weights")
    p.add_argument("--hf-model", required=True, help="HF model folder, config.json, or hub repo id")
    p.add_argument("--dtype", default=None, help="output dtype: bf16, fp16 or fp32 (also spelled bfloat16, float16, "
                                                 "float32), or auto (default: config torch_dtype)")
    p.add_argument("--max-memory", type=_size, default="2GiB", help="memory budget the plan is sized for")
    p.add_argument("--tensors", action="store_true", help="list every output tensor")
    p.add_argument("--layers", action="store_true", help="list every layer: block kinds, bytes, memory it needs")
    p.add_argument("--trust-remote-code", action="store_true", help=argparse.SUPPRESS)
    _add_common(p)
    p.set_defaults(func=cmd_plan)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", **_helps("inspect"), help="list a checkpoint's tensors (name, shape, dtype, bytes, file), totals and "
                                       "architecture, from headers and metadata only")
    p.add_argument("path", help="HF folder, .safetensors file, or torch_dist checkpoint (folder with .metadata, "
                                "an iter_*/release folder, or their parent with the tracker file)")
    p.add_argument("--max-memory", type=_size, default="2GiB",
                   help="bound on what reading a torch_dist .metadata may build (default 2GiB; at least 64MiB)")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", **_helps("demo"), help="generate a tiny Nemotron-shaped checkpoint, convert it, load it with "
                                    "megatron-core and compare logits")
    p.add_argument("--workdir", default=None, help="where to put the demo files (default: a temporary folder); "
                   "its <model>-hf and <model>-mcore folders must not exist yet, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's folders in --workdir")
    _add_common(p)
    p.set_defaults(func=cmd_demo)


def _early_status(args, message: str) -> None:
    """Said before the heavy imports (torch: seconds on a cold start), by rank 0 alone."""
    from streamconv.runtime.progress import status

    status(message, quiet=args.quiet or args.json or not _speaks())


def cmd_hf2mcore(args) -> int:
    _early_status(args, f"hf2mcore: reading the headers of {args.hf_model} and planning")
    from streamconv.commands.hf2mcore import Options, hf2mcore

    opts = Options(dtype=args.dtype, max_memory=args.max_memory, workers=args.workers or engine_workers(),
                   device=args.device,
                   overwrite=args.overwrite, allow_unused=args.allow_unused, drop_mtp=args.drop_mtp, quiet=args.quiet or args.json,
                   chunk_journal=not args.no_staging, zarr_view=args.keep_staging, file_bytes=args.distcp_size,
                   recheck=args.recheck, revision=args.revision, connections=args.connections,
                   download_first=args.download_first)
    if args.no_staging and args.keep_staging:
        raise UsageError("--keep-staging and --no-staging contradict each other; choose one")
    _check_device(args.device)
    with joined() as job:
        summary = hf2mcore(args.hf_model, args.megatron_path, opts, job=job)
    _report(args, summary, f"wrote {summary['output']} ({summary['tensors']} tensors, {_amount(summary)}, "
                           f"peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB)")
    return 0


def cmd_mcore2hf(args) -> int:
    _early_status(args, f"mcore2hf: reading the metadata of {args.megatron_path} and planning")
    from streamconv.commands.mcore2hf import Options, mcore2hf

    opts = Options(hf_config=args.hf_config, dtype=args.dtype, max_memory=args.max_memory,
                   max_shard_size=args.max_shard_size, workers=args.workers or engine_workers(),
                   device=args.device,
                   overwrite=args.overwrite, quiet=args.quiet or args.json, strict=not args.not_strict,
                   recheck=args.recheck)
    _check_device(args.device)
    with joined() as job:
        summary = mcore2hf(args.megatron_path, args.hf_path, opts, job=job)
    _report(args, summary, f"wrote {summary['output']} ({summary['tensors']} tensors in {summary['shards']} shard(s), "
                           f"{_amount(summary)}, "
                           f"peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB)")
    return 0


def cmd_inspect(args) -> int:
    from streamconv.commands.inspect import inspect_command

    return inspect_command(args)


def cmd_verify(args) -> int:
    _early_status(args, f"verify: reading {args.megatron_path} and {args.hf_model}")
    from streamconv.commands.verify import verify_command

    _check_device(args.device)
    return verify_command(args)


def cmd_generate(args) -> int:
    from streamconv.commands.generate import generate_command

    _check_device(args.device)
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    return generate_command(args)


def cmd_plan(args) -> int:
    from streamconv.commands.planview import plan_command

    return plan_command(args)


def cmd_demo(args) -> int:
    from streamconv.commands.demo import run_demo

    return run_demo(args)


def _check_device(device: str) -> None:
    if not device.startswith(("cpu", "cuda")):
        raise UsageError(f"--device {device}: choose cpu or cuda")
    if device.startswith("cuda"):  # (torch only then: a CPU conversion may not need it at all)
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")


def _amount(summary: dict) -> str:
    """Bytes, time and rate in the one convention people see everywhere: binary units (KiB, MiB, GiB).
    ``--json`` has exact numbers (``bytes``, ``seconds``; ``mb_per_s`` is 10^6 bytes per second)."""
    from streamconv.units import fmt_bytes

    rate = summary["bytes"] / max(summary["seconds"], 1e-9)
    return f"{fmt_bytes(summary['bytes'])} in {summary['seconds']:.1f}s, {fmt_bytes(rate)}/s"


def _report(args, summary: dict, line: str) -> None:
    if not _speaks():
        return
    if summary.get("processes"):
        line += f" with {summary['processes']} processes"
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    elif not getattr(args, "quiet", False):
        print(line)
        if sys.stdout.isatty():  # people get the one-screen summary too
            from streamconv.runtime.progress import print_summary

            print_summary(summary)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage and error, not the top level's
        sub = getattr(args, "_subparsers", None)
        name = sys.argv[1:] if argv is None else argv
        which = next((a for a in name if sub is not None and a in sub.choices), None)
        (sub.choices[which] if which else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    with interrupt.signals_as_interrupt():
        try:
            check_address_space()
            return args.func(args)
        except StreamconvError as e:
            if args.debug:
                raise
            return _fail(args, f"error: {e}", e.exit_code)
        except KeyboardInterrupt:
            if args.debug:
                raise
            sig, hint = interrupt.received(), INTERRUPT_HINTS.get(args.command)
            return _fail(args, f"error: interrupted by {signal.Signals(sig).name}{_peers_gone()}"
                               + (f"; {hint}" if hint else ""), 128 + sig)
        except OSError as e:  # an I/O error no command turned into a StreamconvError: still one line
            if args.debug:
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return _fail(args, f"error: {output_error(e.filename, e)}", EXIT_IO)
            return _fail(args, f"error: {e.filename or 'I/O error'}: {e.strerror or e}", EXIT_IO)
        except MemoryError:
            if args.debug:
                raise
            return _fail(args, "error: out of memory (a process limit such as ulimit -v, or the host); lower "
                               "--max-memory and --workers, or raise the limit", EXIT_IO)
        except RuntimeError as e:
            if args.debug or "can't start new thread" not in str(e):
                return _internal(args, e)
            return _fail(args, "error: cannot start a thread (a process or memory limit such as ulimit -u or -v); "
                               "lower --workers, or raise the limit", EXIT_IO)
        except Exception as e:  # a bug: keep the user's screen clean unless asked
            return _internal(args, e)


def run() -> None:
    """The program (``streamconv`` and ``python -m streamconv``): ``main``, then an exit that runs no
    interpreter or C++ teardown. Every command has closed, synced and committed what it wrote by the time
    ``main`` returns; a thread still inside native code then (a reader blocked in a read when a signal came,
    torch's intra-op pool) would otherwise meet static destructors and abort the process with "terminate
    called without an active exception" and exit 134 instead of the documented 130/143."""
    try:
        code = main()
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


MIN_ADDRESS_SPACE = 768 * 1024**2  # measured: torch's import aborts (std::bad_alloc, exit 134) at 400 MB


def check_address_space() -> None:
    """Under ``ulimit -v`` too small for torch to load, say so in one line (exit 4) before importing it: the
    import would otherwise abort the process from C++ with no line of ours."""
    import resource

    from streamconv.errors import OutputError
    from streamconv.units import fmt_bytes

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        err = OutputError(f"the address-space limit (ulimit -v) is {fmt_bytes(soft)}; loading torch needs at least "
                          f"{fmt_bytes(MIN_ADDRESS_SPACE)} and a conversion --max-memory more; raise the limit")
        err.exit_code = EXIT_IO
        raise err


def _peers_gone() -> str:
    """In a distributed run stopped by a signal (torchrun sends SIGTERM when a rank dies): which rank died."""
    from streamconv.runtime import dist

    job = dist.current()
    dead = job.dead_peers() if job is not None else []
    return f" (rank {', '.join(map(str, dead))} ended unexpectedly: killed or crashed)" if dead else ""


def _internal(args, e: Exception) -> int:
    if args.debug:
        raise e
    return _fail(args, f"internal error: {type(e).__name__}: {e} (run again with --debug for a traceback)",
                 EXIT_INTERNAL)


def _speaks() -> bool:
    """Whether this process prints summaries: always alone; rank 0 of a distributed run (the others quiet)."""
    import os

    return not os.environ.get("WORLD_SIZE") or os.environ.get("RANK", "0") == "0"


def _fail(args, line: str, code: int) -> int:
    """One line on stderr (every rank of a distributed run says its own, after its rank); with ``--json``,
    also an error object on stdout for scripts (rank 0 only)."""
    from streamconv.runtime import dist

    job = dist.current()
    if job is not None:
        head, _, rest = line.partition(": ")
        line = f"{head}: {job.prefix}{rest}"
    line = printable(line)
    sys.stderr.write(line + "\n")  # one write: the lines of several ranks on one stderr never interleave
    sys.stderr.flush()
    if getattr(args, "json", False) and _speaks():
        print(json.dumps({"error": line.split(": ", 1)[-1], "exit_code": code}))
    return code
