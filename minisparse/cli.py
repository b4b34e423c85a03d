"""The ``minisparse`` command line: ``main(argv) -> exit code`` over importable functions.

Each subcommand is a parser function ``_x_parser(sub)`` plus a handler ``_x(args) -> int``.
Bad input (a bad flag value, a missing or corrupt file) exits non-zero with one line on
stderr, ``minisparse: error: ...``, and no traceback.
"""

import argparse
import json
import sys

import numpy as np

from .checkpoint import load_checkpoint
from .data import CharTokenizer, make_dataset
from .generate import generate
from .kernels import default_backend, pack_model
from .linear import BACKENDS
from .model import GPT, GPTConfig, count_params
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.handler(args)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _error(str(e))
        return 2
    except (ValueError, OSError) as e:  # DataError, CheckpointError, config errors, I/O
        _error(str(e))
        return 1


def _error(message: str) -> None:
    print(f"minisparse: error: {' '.join(message.split())}", file=sys.stderr)


def build_parser() -> Parser:
    parser = Parser(prog="minisparse", description="Q-Sparse + BitNet b1.58 in NumPy.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    _info_parser(sub)
    # --- oracle commands --- (register parsers here; define them in the section below)
    _vectors_parser(sub)
    _check_parser(sub)
    # --- bench ---
    _bench_parser(sub)
    # --- sweep ---
    _sweep_parser(sub)
    _ablate_parser(sub)
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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# the flags (argparse dests) that set GPTConfig fields; shared by train and info
MODEL_FLAGS = ("context", "d_model", "n_layers", "n_heads", "ffn_hidden", "ffn_act",
               "sparsity", "block", "rescale", "bits")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (SPEC section 6; unset flags keep the default or the "
                             "checkpoint's value)", argument_default=argparse.SUPPRESS)
    g.add_argument("--context", type=_positive_int, metavar="N", help="context length (64)")
    g.add_argument("--d-model", type=_positive_int, metavar="N", help="model width (128)")
    g.add_argument("--n-layers", type=_positive_int, metavar="N", help="transformer blocks (4)")
    g.add_argument("--n-heads", type=_positive_int, metavar="N", help="attention heads (4)")
    g.add_argument("--ffn-hidden", type=_positive_int, metavar="N",
                   help="FFN width (16*round(8d/3/16))")
    g.add_argument("--ffn-act", choices=("relu2", "silu"), help="FFN gate activation (relu2)")
    g.add_argument("--sparsity", type=float, metavar="S", help="top-K sparsity in [0, 1) (0)")
    g.add_argument("--block", type=_block, metavar="N:M", help="block top-K, e.g. 16:32")
    g.add_argument("--rescale", choices=("none", "l2"), help="re-scale after top-K (none)")
    g.add_argument("--bits", type=_bits, metavar="1.58|none",
                   help="1.58: ternary weights + int8 activations (none)")


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
    g.add_argument("--iters", type=_positive_int, metavar="N", help="training steps (2000)")
    g.add_argument("--batch", type=_positive_int, metavar="N", help="batch size (12)")
    g.add_argument("--lr", type=float, metavar="X", help="peak learning rate (1e-3)")
    g.add_argument("--min-lr", type=float, metavar="X", help="final learning rate (1e-4)")
    g.add_argument("--warmup", type=int, metavar="N", help="linear warm-up steps (100)")
    g.add_argument("--weight-decay", type=float, metavar="X",
                   help="AdamW weight decay on matrices (0.1)")
    g.add_argument("--grad-clip", type=float, metavar="X", help="global grad-norm clip (1.0)")
    g.add_argument("--eval-interval", type=_positive_int, metavar="N",
                   help="validate every N steps (250)")
    g.add_argument("--eval-batches", type=_positive_int, metavar="N",
                   help="batches per validation (20)")
    g.add_argument("--final-eval-batches", type=_positive_int,
                   help="batches of the final validation (200)")
    g.add_argument("--ckpt-interval", type=_positive_int, metavar="N",
                   help="checkpoint every N steps (500)")
    g.add_argument("--log-interval", type=_positive_int, metavar="N",
                   help="log line every N steps when not on a terminal (50)")
    g.add_argument("--seed", type=int, metavar="N", help="random seed (0)")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    settings = {k: v for k, v in vars(args).items() if k in SETTING_FLAGS}
    result = train(_model_overrides(args), settings, data_path=args.data, out_dir=args.out,
                   resume=args.resume, init_from=args.init_from, overwrite=args.overwrite,
                   backend=args.backend, progress=not args.quiet)
    if result.stopped is not None and result.stopped.startswith("interrupted"):
        print(f"minisparse: {result.stopped}; continue with: minisparse train --resume "
              f"--out {args.out}", file=sys.stderr)
        return 130
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
    p = sub.add_parser("sample", help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="a .npz checkpoint (e.g. runs/default/ckpt.npz)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=500, help="characters to sample (500)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (1.0)")
    p.add_argument("--top-k", type=_positive_int, metavar="N",
                   help="sample from the k most likely only")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _add_backend_flag(p)
    p.set_defaults(handler=_sample)


def _sample(args) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    model = _model(ckpt, args.backend)
    if (args.backend or default_backend()) == "numba":
        pack_model(model)  # decode GEMVs read packed weights: kept rows only, 2-bit ternary
    tokenizer = CharTokenizer(ckpt.vocab)
    ids = generate(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed, tokenizer=tokenizer)
    print(tokenizer.decode(ids))
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
    p.add_argument("--batches", type=_positive_int, default=200,
                   help="random validation batches (200)")
    p.add_argument("--batch", type=_positive_int, metavar="N",
                   help="batch size (the checkpoint's, or 12)")
    p.add_argument("--seed", type=int, metavar="N",
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
    print(json.dumps({"val_loss": loss}) if args.json else f"val loss {loss:.4f}")
    return 0


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


def _info(args) -> int:
    overrides = _model_overrides(args)
    if args.checkpoint is not None:
        ckpt = load_checkpoint(args.checkpoint)
        config = GPTConfig.from_dict({**ckpt.config.to_dict(), **overrides})
        extra = {"step": ckpt.step, "data": ckpt.data.get("source")}
    else:
        config = GPTConfig.from_dict({"vocab_size": args.vocab_size, **overrides})
        extra = {}
    counts = count_params(config)
    if args.json:
        print(json.dumps({"config": config.to_dict(), **counts, **extra}))
        return 0
    for key, value in {**config.to_dict(), **extra}.items():
        print(f"{key:>16}: {value}")
    print(f"{'N':>16}: {counts['N']:,} parameters")
    print(f"{'N_a':>16}: {counts['N_a']:,} activated per token")
    print(f"{'overall sparsity':>16}: {counts['sparsity']:.2%} (1 - N_a/N over the projections)")
    return 0


# --- oracle commands ---


def _vectors_parser(sub) -> None:
    p = sub.add_parser("vectors", help="write golden test vectors (.npz) for every op",
                       description="Write the oracle's golden vectors: one .npz per op and case "
                                   "(inputs, outputs, gradients), and README.txt on the format.")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (0)")
    p.set_defaults(handler=_vectors)


def _vectors(args) -> int:
    from .oracle import write_vectors

    paths = write_vectors(args.out_dir, seed=args.seed)
    print(f"wrote {len(paths)} golden vectors, README.txt and SPEC.md to {args.out_dir}")
    return 0


CHECK_OPS = ("k_for, topk, block_topk, sparsify, threshold, absmax, absmean, absmax_fake, "
             "absmean_fake, sparse_linear, bitlinear, bitlinear_int, ffn, moe")


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
    p.add_argument("--op", required=True, help=f"the op fn implements: {CHECK_OPS}")
    p.add_argument("--max-examples", type=_positive_int, default=200,
                   help="generated cases (200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cases (0)")
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
    try:
        from .oracle.harness import check, load_function
    except ImportError as e:  # hypothesis missing
        raise ValueError(str(e)) from None
    report = check(args.op, load_function(args.target), max_examples=args.max_examples,
                   seed=args.seed, dtypes=tuple(args.dtype or ("float32", "float64")),
                   min_size=args.min_size, max_size=args.max_size, fixed=_fixed(args.fix),
                   device=args.device, save=args.save, target=args.target)
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
    g.add_argument("--iters", type=_positive_int, default=iters, help=f"steps per run ({iters})")
    g.add_argument("--batch", type=_positive_int, default=12, help="batch size (12)")
    g.add_argument("--context", type=_positive_int, default=64, help="context length (64)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3)")
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
    p.add_argument("--seeds", type=_list(int, "integers"), default=(0,), metavar="SEED,...",
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
        "ablate", help="paper ablations: ste | block | continue",
        description="ste: top-K with STE vs masked gradient vs ReLU-only (Figs 8-9); block: "
                    "Block Q-Sparse 16:32 vs top-K 50%% vs dense (Fig 7); continue: dense "
                    "then Q-Sparse vs Q-Sparse from scratch vs dense (section 4.2). Resumable; "
                    "writes OUT/results.csv and OUT/KIND.png.")
    p.add_argument("kind", choices=("ste", "block", "continue"))
    p.add_argument("--out", default="runs/ablate", metavar="DIR",
                   help="output directory (runs/ablate)")
    p.add_argument("--d-model", type=_positive_int, default=64, help="model width (64)")
    p.add_argument("--n-layers", type=_positive_int, default=2, help="blocks (2)")
    p.add_argument("--sparsity", type=float, default=0.7,
                   help="top-K sparsity of ste and continue (0.7)")
    p.add_argument("--seed", type=int, default=0, help="seed (0)")
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
