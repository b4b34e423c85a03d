"""The ``minisparse`` command line: ``main(argv) -> exit code`` over importable functions.

Each subcommand is a parser function ``_x_parser(sub)`` plus a handler ``_x(args) -> int``.
Bad input (a bad flag value, a missing or corrupt file) exits non-zero with one line on
stderr, ``minisparse: error: ...``, and no traceback: exit 2 for usage errors, 1 for
everything else (a last-resort handler turns any unexpected exception into that one line),
130 for Ctrl-C; ``train`` stopped by a signal saves and exits 128 + the signal's number
(130 SIGINT, 143 SIGTERM, 129 SIGHUP).
"""

import argparse
import dataclasses
import itertools
import json
import os
import signal
import sys
import threading

import numpy as np

from . import __version__
from .backend import BACKENDS, default_backend
from .checkpoint import load_checkpoint, param_count
from .data import CharTokenizer, get_batch, make_dataset
from .generate import sample_tokens
from .linear import ACTIVATIONS
from .model import FFNS, GPT, GPTConfig, count_params
from .sparsity import RESCALES
from .tensor import no_grad
from .train import TrainSettings, evaluate, resolve_text, train

DEFAULT_OUT = "runs/default"


class UsageError(Exception):
    """A command-line usage error (argparse's message, reported on one line)."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise UsageError instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def main(argv=None) -> int:
    """Run one ``minisparse`` command; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as e:  # --help / --version, or a user module's sys.exit (check)
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        _interrupted()
        return 130
    except BrokenPipeError:  # e.g. `minisparse sample ... | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except MemoryError:
        _error("out of memory (a smaller --batch or model may fit)")
        return 1
    except (ValueError, OSError) as e:  # DataError, CheckpointError, config errors, I/O
        _error(str(e) or type(e).__name__)
        return 1
    except Exception as e:  # noqa: BLE001 -- the last resort: one line, never a traceback
        _error(f"{type(e).__name__}: {e}")
        return 1


def _interrupted() -> None:
    """Report a Ctrl-C; a second Ctrl-C while doing so must not end in a traceback."""
    if threading.current_thread() is not threading.main_thread():
        _error("interrupted")
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _error("interrupted")
    finally:
        signal.signal(signal.SIGINT, previous)


def _error(message: str) -> None:
    try:
        print(f"minisparse: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    except OSError:  # stderr itself is gone (a closed terminal): nothing left to tell
        pass


def build_parser() -> Parser:
    parser = Parser(prog="minisparse", description="Q-Sparse + BitNet b1.58 in NumPy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    _info_parser(sub)
    _calibrate_parser(sub)
    # --- oracle commands --- (register parsers here; define them in the section below)
    _vectors_parser(sub)
    _check_parser(sub)
    # --- bench ---
    _bench_parser(sub)
    # --- sweep ---
    _sweep_parser(sub)
    _ablate_parser(sub)
    # --- conversion ---
    _export_parser(sub)
    _import_parser(sub)
    return parser


# ---------------------------------------------------------------------------------------------
# Flag types and shared flags


def _block(text: str):
    """'16:32' -> (16, 32); 'none' -> None."""
    if text.lower() == "none":
        return None
    n, sep, m = text.partition(":")
    if not sep or not n.isdigit() or not m.isdigit():
        raise argparse.ArgumentTypeError(f"expected N:M such as 16:32, got {text!r}")
    return int(n), int(m)


def _bits(text: str):
    """'1.58' -> 1.58; 'none' / '16' / '32' (full precision) -> None."""
    if text.lower() in ("none", "16", "32"):
        return None
    if text == "1.58":
        return 1.58
    raise argparse.ArgumentTypeError(f"expected 1.58 or none, got {text!r}")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def _int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds, counts)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


# the flags (argparse dests) that set GPTConfig fields; shared by train and info
MODEL_FLAGS = ("context", "d_model", "n_layers", "n_heads", "ffn_hidden", "ffn_act",
               "sparsity", "block", "rescale", "bits", "ffn", "n_experts", "top_experts",
               "moe_aux")


MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
TRAIN_DEFAULTS = TrainSettings()


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (SPEC section 6; unset flags keep the default or the "
                             "checkpoint's value)", argument_default=argparse.SUPPRESS)
    d = MODEL_DEFAULTS
    g.add_argument("--context", type=_positive_int, metavar="N",
                   help=f"context length ({d['context']})")
    g.add_argument("--d-model", type=_positive_int, metavar="N",
                   help=f"model width ({d['d_model']})")
    g.add_argument("--n-layers", type=_positive_int, metavar="N",
                   help=f"transformer blocks ({d['n_layers']})")
    g.add_argument("--n-heads", type=_positive_int, metavar="N",
                   help=f"attention heads ({d['n_heads']})")
    g.add_argument("--ffn-hidden", type=_positive_int, metavar="N",
                   help="FFN width (16*round(8d/3/16))")
    g.add_argument("--ffn-act", choices=ACTIVATIONS,
                   help=f"FFN gate activation ({d['ffn_act']})")
    g.add_argument("--sparsity", type=float, metavar="S",
                   help=f"top-K sparsity in [0, 1) ({d['sparsity']:g})")
    g.add_argument("--block", type=_block, metavar="N:M", help="block top-K, e.g. 16:32")
    g.add_argument("--rescale", choices=RESCALES,
                   help=f"re-scale after top-K ({d['rescale']})")
    g.add_argument("--bits", type=_bits, metavar="1.58|none",
                   help=f"1.58: ternary weights + int8 activations ({d['bits'] or 'none'})")
    g.add_argument("--ffn", choices=FFNS, help="feed-forward: one GLU or a mixture of GLU "
                   f"experts ({d['ffn']})")
    g.add_argument("--experts", dest="n_experts", type=_positive_int, metavar="E",
                   help="experts per MoE layer (with --ffn moe)")
    g.add_argument("--top-experts", dest="top_experts", type=_positive_int, metavar="K",
                   help="experts each token is routed to (with --ffn moe)")
    g.add_argument("--moe-aux", type=float, metavar="X",
                   help=f"weight of the load-balancing loss ({d['moe_aux']:g})")


def _add_backend_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS,
                   help="sparse_linear implementation (default: Numba kernels if available)")


def _model_overrides(args) -> dict:
    """The model flags the user set (unset ones are absent from ``args``)."""
    return {k: v for k, v in vars(args).items() if k in MODEL_FLAGS}


# ---------------------------------------------------------------------------------------------
# train


SETTING_FLAGS = ("iters", "batch", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
                 "eval_interval", "eval_batches", "final_eval_batches", "ckpt_interval",
                 "log_interval", "seed")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: the SPEC section 9 recipe)",
                       description="Train a GPT on the bundled tiny Shakespeare or --data PATH; "
                                   "checkpoints go to OUT/ckpt.npz.")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: tiny Shakespeare)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue OUT/ckpt.npz")
    start.add_argument("--init-from", metavar="CKPT",
                       help="start from CKPT's parameters (fresh optimizer), e.g. dense -> "
                            "sparse with --sparsity")
    start.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUT/ckpt.npz with a fresh run")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_backend_flag(p)
    _add_model_flags(p)
    g = p.add_argument_group("training (SPEC section 9; unset flags keep the default or, with "
                             "--resume, the checkpoint's value)",
                             argument_default=argparse.SUPPRESS)
    for name, metavar, what in (
            ("iters", "N", "training steps"), ("batch", "N", "batch size"),
            ("lr", "X", "peak learning rate"), ("min_lr", "X", "final learning rate"),
            ("warmup", "N", "linear warm-up steps"),
            ("weight_decay", "X", "AdamW weight decay on matrices"),
            ("grad_clip", "X", "global grad-norm clip"),
            ("eval_interval", "N", "validate every N steps"),
            ("eval_batches", "N", "batches per validation"),
            ("final_eval_batches", "N", "batches of the final validation"),
            ("ckpt_interval", "N", "checkpoint every N steps"),
            ("log_interval", "N", "log line every N steps when not on a terminal"),
            ("seed", "N", "random seed")):
        g.add_argument(f"--{name.replace('_', '-')}", type=_setting(name), metavar=metavar,
                       help=f"{what} ({getattr(TRAIN_DEFAULTS, name):g})")
    p.set_defaults(handler=_train)


def _setting(name: str):
    """argparse type for the train setting ``name``: parsed like its default (int or float)
    and validated by TrainSettings.check, the one place each setting is checked."""
    kind = type(getattr(TRAIN_DEFAULTS, name))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return TrainSettings.check(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _train(args) -> int:
    settings = {k: v for k, v in vars(args).items() if k in SETTING_FLAGS}
    result = train(_model_overrides(args), settings, data_path=args.data, out_dir=args.out,
                   resume=args.resume, init_from=args.init_from, overwrite=args.overwrite,
                   backend=args.backend, progress=not args.quiet)
    if result.signal is not None:
        try:
            print(f"minisparse: {result.stopped}; continue with: minisparse train --resume "
                  f"--out {args.out}", file=sys.stderr)
        except OSError:  # SIGHUP: the terminal is gone; the checkpoint is what matters
            pass
        return 128 + result.signal
    if result.stopped is not None:
        _error(result.stopped)
        return 1
    if not args.quiet:
        print(f"done: {result.step} steps, val loss {result.final_val_loss:.4f}, "
              f"checkpoint {result.checkpoint}")
    return 0


# ---------------------------------------------------------------------------------------------
# sample


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample text from a checkpoint (printed as it comes)")
    p.add_argument("checkpoint", help="a .npz checkpoint (e.g. runs/default/ckpt.npz)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=_int, default=500, metavar="N",
                   help="characters to sample (%(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="0 = greedy (%(default)s)")
    p.add_argument("--top-k", type=_positive_int, metavar="N",
                   help="sample from the k most likely only")
    p.add_argument("--seed", type=_int, default=0, metavar="N", help="random seed (%(default)s)")
    _add_backend_flag(p)
    p.set_defaults(handler=_sample)


def _sample(args) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model = _model(ckpt, args.backend)
    if (args.backend or default_backend()) == "numba":
        from .kernels import pack_model

        pack_model(model)  # decode GEMVs read packed weights: kept rows only, 2-bit ternary
    tokenizer = CharTokenizer(ckpt.vocab)
    ids = [int(i) for i in tokenizer.encode(args.prompt)]  # the prompt, then each new token
    tokens = sample_tokens(model, ids, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, rng=np.random.default_rng(args.seed))
    first = next(tokens, None)  # validates the options before the prompt is echoed
    print(args.prompt, end="", flush=True)
    if first is not None:
        for token in itertools.chain([first], tokens):  # one character at a time, as generated
            ids.append(token)
            print(tokenizer.decode([token]), end="", flush=True)
    print(flush=True)
    if ckpt.config.sparsify == "threshold":
        from .sweep import activation_sparsity

        window = np.array([ids[-ckpt.config.context:]])
        print(f"measured activation sparsity {activation_sparsity(model, [window]):.4f} "
              f"(calibration target {ckpt.config.sparsity:g})", file=sys.stderr)
    return 0


def _model(ckpt, backend) -> GPT:
    return GPT.from_params(ckpt.config, ckpt.params, backend=backend)


# ---------------------------------------------------------------------------------------------
# eval


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss of a checkpoint")
    p.add_argument("checkpoint", help="a .npz checkpoint")
    p.add_argument("--data", metavar="PATH",
                   help="UTF-8 text whose last 10%% is the validation set (default: the "
                        "checkpoint's training data)")
    p.add_argument("--batches", type=_setting("final_eval_batches"),
                   default=TRAIN_DEFAULTS.final_eval_batches,
                   help="random validation batches (%(default)s)")
    p.add_argument("--batch", type=_setting("batch"), metavar="N",
                   help=f"batch size (the checkpoint's, or {TRAIN_DEFAULTS.batch})")
    p.add_argument("--seed", type=_setting("eval_seed"), metavar="N",
                   help="validation batch seed (the checkpoint's eval seed)")
    p.add_argument("--json", action="store_true", help='print {"val_loss": ...}')
    _add_backend_flag(p)
    p.set_defaults(handler=_eval)


def _eval(args) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    saved = TrainSettings.from_dict(ckpt.settings)
    text, _ = resolve_text(None, args.data, ckpt.data)
    data = make_dataset(text, ckpt.config.context, CharTokenizer(ckpt.vocab))
    seed = saved.eval_seed if args.seed is None else args.seed
    batch = saved.batch if args.batch is None else args.batch
    model = _model(ckpt, args.backend)
    loss = evaluate(model, data.val, np.random.default_rng(seed), args.batches, batch)
    report = {"val_loss": loss, **_measured(model, data.val, seed, batch)}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"val loss {loss:.4f}")
    if "act_sparsity" in report:
        print(f"measured activation sparsity {report['act_sparsity']:.4f} (calibration target "
              f"{model.config.sparsity:g})")
    if "expert_load" in report:
        for i, load in enumerate(report["expert_load"]):
            print(f"layer {i} expert load {' '.join(f'{f:.3f}' for f in load)}")
    return 0


def _measured(model, val, seed, batch) -> dict:
    """What eval measures besides the loss, on one validation batch: the activation sparsity of
    a thresholded model (it varies per token), and each MoE layer's fraction of tokens per
    expert."""
    out = {}
    idx = get_batch(np.random.default_rng(seed), val, batch, model.config.context)[0]
    if model.config.sparsify == "threshold":
        from .sweep import activation_sparsity

        out["act_sparsity"] = activation_sparsity(model, [idx])
    if model.config.ffn == "moe":
        with no_grad():
            model(idx)
        out["expert_load"] = model.expert_load()
    return out


# ---------------------------------------------------------------------------------------------
# info


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="config, N, N_a and overall sparsity (SPEC section 7)",
                       description="For a checkpoint, or for the model the flags describe.")
    p.add_argument("checkpoint", nargs="?", help="a .npz checkpoint (omit to use the flags)")
    p.add_argument("--vocab-size", type=_positive_int, default=65,
                   help="vocabulary size without a checkpoint (65, tiny Shakespeare)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_flags(p)
    p.set_defaults(handler=_info)


MAX_INFO_ARRAYS = 10**6  # count_params lists every array; a million layers' worth is enough


def _info(args) -> int:
    overrides = _model_overrides(args)
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint)
        config = GPTConfig.from_dict({**ckpt.config.to_dict(), **overrides})
        extra = {"step": ckpt.step, "data": ckpt.data.get("source")}
    else:
        config = GPTConfig.from_dict({"vocab_size": args.vocab_size, **overrides})
        extra = {}
    arrays = param_count(config)[0]
    if arrays > MAX_INFO_ARRAYS:
        raise ValueError(f"a model of {config.n_layers:,} layers has {arrays:,} parameter arrays, "
                         f"too many to list (at most {MAX_INFO_ARRAYS:,})")
    counts = count_params(config)
    if args.json:
        print(json.dumps({"config": config.to_dict(), **counts, **extra}))
        return 0
    for key, value in {**config.to_dict(), **extra}.items():
        print(f"{key:>16}: {value}")
    print(f"{'N':>16}: {counts['N']:,} parameters")
    print(f"{'N_a':>16}: {counts['N_a']:,} activated per token"
          + (" (thresholds: K_in at the calibration target sparsity; the real count varies "
             "per token, eval measures it)" if config.sparsify == "threshold" else "")
          + (f" (router + {config.top_experts} of {config.n_experts} experts)"
             if config.ffn == "moe" else ""))
    print(f"{'overall sparsity':>16}: {counts['sparsity']:.2%} (1 - N_a/N over the projections)")
    return 0


# ---------------------------------------------------------------------------------------------
# calibrate


def _calibrate_parser(sub) -> None:
    from .calibrate import DEFAULT_TOKENS

    p = sub.add_parser("calibrate", help="training-free threshold sparsity (SPEC section 11)",
                       description="Calibrate one threshold per projection input of every "
                                   "block from one forward pass over training-split tokens, "
                                   "and write the thresholded model to OUT.")
    p.add_argument("checkpoint", help="a .npz checkpoint (e.g. a dense model)")
    p.add_argument("--sparsity", type=float, required=True, metavar="S",
                   help="target activation sparsity in [0, 1)")
    p.add_argument("--out", required=True, metavar="NEW.npz", help="checkpoint to write")
    p.add_argument("--tokens", type=_positive_int, default=DEFAULT_TOKENS, metavar="N",
                   help=f"calibration tokens, whole windows of the context ({DEFAULT_TOKENS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (0)")
    p.add_argument("--data", metavar="PATH",
                   help="UTF-8 text whose first 90%% is the training split (default: the "
                        "checkpoint's training data)")
    p.set_defaults(handler=_calibrate)


def _calibrate(args) -> int:
    from .calibrate import calibrate
    from .checkpoint import save_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    text, _ = resolve_text(None, args.data, ckpt.data)
    new, taus = calibrate(ckpt, args.sparsity, text, tokens=args.tokens, seed=args.seed)
    save_checkpoint(args.out, new)
    print(f"calibrated {len(taus)} thresholds for sparsity {args.sparsity:g} on "
          f"{new.history['calibration']['tokens']} tokens: {args.out}")
    return 0


# --- oracle commands ---


def _vectors_parser(sub) -> None:
    p = sub.add_parser("vectors", help="write golden test vectors (.npz) for every op",
                       description="Write the oracle's golden vectors: one .npz per op and case "
                                   "(inputs, outputs, gradients), and README.txt on the format.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the random inputs (0)")
    p.set_defaults(handler=_vectors)


def _vectors(args) -> int:
    from .oracle import write_vectors

    paths = write_vectors(args.out_dir, seed=args.seed)
    print(f"wrote {len(paths)} golden vectors, README.txt and SPEC.md to {args.out_dir}")
    return 0


class _CheckOps:
    """The op names ``check --op`` accepts: the conformance harness's OPS, imported only when
    argparse needs them (checking a value, printing help), as hypothesis is slow to import."""

    def _names(self):
        try:
            from .oracle.harness import OPS
        except ImportError as e:  # hypothesis missing
            raise UsageError(f"check needs hypothesis: {e}") from None
        return sorted(OPS)

    def __contains__(self, name):
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _check_parser(sub) -> None:
    p = sub.add_parser("check", help="check your implementation of an op against the reference",
                       description="Run generated cases (sizes at tile edges up to 4096, ties, "
                                   "quantization ties, exact halves, tiny and huge rows) through "
                                   "MODULE:FUNCTION (NumPy or torch; a torch nn.Module class for "
                                   "--op bitlinear) and the reference; print the first failing "
                                   "input, shrunk. Calling convention per op: pydoc "
                                   "minisparse.oracle.harness")
    p.add_argument("target", metavar="MODULE:FUNCTION",
                   help="e.g. mykernels:topk, path/to/file.py:topk or bitlinear.py:BitLinear")
    p.add_argument("--op", required=True, choices=_CheckOps(), metavar="OP",
                   help="the op FUNCTION implements: %(choices)s")
    p.add_argument("--max-examples", type=_positive_int, default=200,
                   help="generated cases (200)")
    p.add_argument("--seed", type=_int, default=0, help="seed of the generated cases (0)")
    p.add_argument("--dtype", action="append", metavar="DTYPE",
                   help="a dtype fn supports: float64, float32, float16 or bfloat16 (repeat for "
                        "several; default float32 and float64)")
    p.add_argument("--min-size", type=_positive_int, default=1, help="smallest axis size (1)")
    p.add_argument("--max-size", type=_positive_int, default=4096,
                   help="largest axis size (4096)")
    p.add_argument("--fix", action="append", metavar="NAME=VALUE", default=[],
                   help="hold a parameter at one value, e.g. --fix bits=1.58 --fix rescale=none "
                        "(VALUE is JSON, or a plain word)")
    p.add_argument("--device", default="cpu", help="torch device for torch functions (cpu)")
    p.add_argument("--save", metavar="DIR",
                   help="save a failure in DIR as .npz plus a script that reruns it")
    p.set_defaults(handler=_check)


def _fixed(items):
    """['bits=1.58', 'rescale=none', 'block=null'] -> {'bits': 1.58, 'rescale': 'none', ...}."""
    import json

    fixed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--fix expects NAME=VALUE, got {item!r}")
        try:
            fixed[name] = json.loads(value)
        except json.JSONDecodeError:
            fixed[name] = value
        if isinstance(fixed[name], list):
            fixed[name] = tuple(fixed[name])
    return fixed


def _check(args) -> int:
    from .oracle.harness import check, load_function  # importable: --op's choices came from it

    try:
        fn = load_function(args.target)
    except SyntaxError as e:
        raise ValueError(f"{e.filename}, line {e.lineno}: {e.msg} (in {args.target})") from None
    report = check(args.op, fn, max_examples=args.max_examples, seed=args.seed,
                   dtypes=tuple(args.dtype or ("float32", "float64")), min_size=args.min_size,
                   max_size=args.max_size, fixed=_fixed(args.fix), device=args.device,
                   save=args.save, target=args.target)
    print(report)
    return 0 if report.passed else 1

# --- bench ---


def _bench_parser(sub):
    """``minisparse bench``: parser and handler live in bench.py (imported only when used)."""
    from .bench import add_parser

    add_parser(sub)


# --- sweep ---


def _list(kind, name):
    """argparse type: a comma-separated list of `kind` ('0,0.5,0.7')."""

    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(","))
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {name}, "
                                             f"got {text!r}") from None

    return parse


def _size(text: str):
    """'64x2' -> (d_model 64, n_layers 2)."""
    d, sep, n = text.partition("x")
    if not sep or not d.isdigit() or not n.isdigit():
        raise ValueError(text)
    return int(d), int(n)


def _recipe_flags(p, iters: int) -> None:
    g = p.add_argument_group("recipe (shared by every run)")
    g.add_argument("--iters", type=_setting("iters"), default=iters,
                   help="steps per run (%(default)s)")
    g.add_argument("--batch", type=_setting("batch"), default=TRAIN_DEFAULTS.batch,
                   help="batch size (%(default)s)")
    g.add_argument("--context", type=_positive_int, default=MODEL_DEFAULTS["context"],
                   help="context length (%(default)s)")
    g.add_argument("--lr", type=_setting("lr"), default=TRAIN_DEFAULTS.lr,
                   help="peak learning rate (%(default)s)")
    p.add_argument("--data", metavar="PATH", help="UTF-8 text file (default: tiny Shakespeare)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (needs matplotlib)")
    p.add_argument("--progress", action="store_true", help="show each run's progress")


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train a grid of sizes x sparsities and fit the scaling law (SPEC 8)",
        description="Train every (size, sparsity, bits, seed) of the grid, skipping runs "
                    "already in OUT/results.csv (an interrupted run resumes from its "
                    "checkpoint), then fit L(N, S) = E + (B + C exp(beta/(1-S))) / N^alpha "
                    "and report E, B, C, alpha, beta and S* (OUT/fit.json, OUT/scaling.png).")
    p.add_argument("--out", default="runs/sweep", metavar="DIR", help="output directory "
                   "(runs/sweep)")
    p.add_argument("--sizes", type=_list(_size, "DxL sizes"), default=((32, 1), (48, 1),
                   (64, 2), (96, 2)), metavar="DxL,...",
                   help="d_model x n_layers (32x1,48x1,64x2,96x2); heads of 32")
    p.add_argument("--sparsities", type=_list(float, "numbers"), default=(0.0, 0.5, 0.7, 0.85),
                   metavar="S,...", help="top-K sparsities (0,0.5,0.7,0.85)")
    p.add_argument("--bits", type=_list(_bits, "1.58|none"), default=(None,),
                   metavar="none|1.58,...", help="precisions; one fit per value (none)")
    p.add_argument("--seeds", type=_list(_int, "integers >= 0"), default=(0,), metavar="SEED,...",
                   help="seeds (0)")
    p.add_argument("--final-eval-batches", type=_positive_int, default=50,
                   help="validation batches of each run's final loss (50)")
    _recipe_flags(p, iters=300)
    p.set_defaults(handler=_sweep)


def _sweep(args) -> int:
    from .sweep import Grid, run_sweep

    grid = Grid(sizes=args.sizes, sparsities=args.sparsities, bits=args.bits, seeds=args.seeds,
                iters=args.iters, batch=args.batch, context=args.context, lr=args.lr,
                final_eval_batches=args.final_eval_batches)
    try:
        run_sweep(grid, args.out, data_path=args.data, plot=not args.no_plot,
                  progress=args.progress)
    except KeyboardInterrupt as e:
        _error(f"{e or 'interrupted'}; run the same command again to resume")
        return 130
    return 0


def _ablate_parser(sub) -> None:
    p = sub.add_parser(
        "ablate", help="ablations: ste | block | continue | moe | threshold",
        description="ste: top-K with STE vs masked gradient vs ReLU-only (Figs 8-9); block: "
                    "Block Q-Sparse 16:32 vs top-K 50%% vs dense (Fig 7); continue: dense "
                    "then Q-Sparse vs Q-Sparse from scratch vs dense (section 4.2); moe: GLU vs "
                    "4 experts top-1 at the same active parameters, both top-K 0.5; threshold: "
                    "the dense model with calibrated thresholds (no training) vs Q-Sparse "
                    "trained, at S = 0.25, 0.4, 0.5, 0.6, 0.7. Resumable; writes "
                    "OUT/results.csv and OUT/KIND.png (moe, threshold: OUT/KIND.md, .json).")
    p.add_argument("kind", choices=("ste", "block", "continue", "moe", "threshold"))
    p.add_argument("--out", default="runs/ablate", metavar="DIR",
                   help="output directory (runs/ablate)")
    p.add_argument("--d-model", type=_positive_int, default=64, help="model width (64)")
    p.add_argument("--n-layers", type=_positive_int, default=2, help="blocks (2)")
    p.add_argument("--sparsity", type=float, default=0.7,
                   help="top-K sparsity of ste and continue (0.7)")
    p.add_argument("--seed", type=_int, default=0, help="seed (0)")
    _recipe_flags(p, iters=600)
    p.set_defaults(handler=_ablate)


def _ablate(args) -> int:
    from .sweep import run_ablation

    try:
        run_ablation(args.kind, args.out, data_path=args.data, plot=not args.no_plot,
                     progress=args.progress, d_model=args.d_model, n_layers=args.n_layers,
                     sparsity=args.sparsity, iters=args.iters, seed=args.seed,
                     batch=args.batch, context=args.context, lr=args.lr)
    except KeyboardInterrupt as e:
        _error(f"{e or 'interrupted'}; run the same command again to resume")
        return 130
    return 0


# --- conversion ---


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as .safetensors, .pt or .gguf",
                       description="Write CKPT's parameters (SPEC 6 names) with its config and "
                                   "vocabulary: .safetensors (metadata as JSON strings), .pt (a "
                                   "dict for torch.load(weights_only=True)) or .gguf (llama.cpp).")
    p.add_argument("checkpoint", metavar="CKPT", help="a .npz checkpoint")
    p.add_argument("--to", required=True, metavar="FILE",
                   help="output file: model.safetensors, model.pt or model.gguf")
    p.set_defaults(handler=_export)


def _export(args) -> int:
    from .convert import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.to)}")
    return 0


def _import_parser(sub) -> None:
    p = sub.add_parser("import", help="turn a .safetensors or .pt export into a checkpoint",
                       description="Read FILE (as `minisparse export` writes it) and write a "
                                   "minisparse checkpoint that eval, sample and train "
                                   "--init-from read (model only: no optimizer state).")
    p.add_argument("file", metavar="FILE", help="model.safetensors or model.pt")
    p.add_argument("--out", required=True, metavar="CKPT", help="the .npz checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CKPT")
    p.set_defaults(handler=_import)


def _import(args) -> int:
    from .convert import import_checkpoint

    ckpt = import_checkpoint(args.file, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} ({ckpt.config.n_layers} layers, step {ckpt.step})")
    return 0
