"""The SPEC section 9 recipe in PyTorch, on one process or many (DistributedDataParallel).

    python -m minisparse.torch.train [minisparse train flags]
    torchrun --nproc_per_node N -m minisparse.torch.train [minisparse train flags]

Same flags, data pipeline, init and recipe as ``minisparse train``: one
``np.random.default_rng(seed)`` draws the initial weights (in the NumPy model's order) and
then every global batch; with N processes each rank draws the same global batch and trains on
its own consecutive slice of ``batch / N`` rows, and DDP averages the gradients -- so an
N-process run follows the 1-process run up to float rounding (the all-reduce sums the
per-rank gradients in another order). gloo on the CPU, NCCL on CUDA, bf16 autocast on a GPU.
Checkpoints are minisparse's own (``minisparse eval`` / ``sample`` / ``train --resume`` read
them; the AdamW moments are stored in the engine's format). Ctrl-C (SIGINT on every process)
saves at the next step boundary, which all ranks agree on. As in ``minisparse train``, a
diverging run (a non-finite loss or state, or a loss far above ln V) stops without touching
the last good checkpoint: rank 0 checks every state before writing it and all ranks stop on
its word.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from ..data import CharTokenizer, DataError, get_batch, make_dataset
from ..model import GPT as EngineGPT
from ..model import param_shapes
from ..optim import lr_at
from ..train import (
    CKPT_NAME,
    DIVERGED,
    TrainResult,
    _config,
    _diverged,
    _Progress,
    _settings,
    _Signals,
    _stop_reason,
    end_of_step,
    resolve_text,
)
from ..train import evaluate as engine_evaluate
from .model import GPT


def evaluate(model: GPT, data: np.ndarray, rng: np.random.Generator, batches: int,
             batch: int = 12) -> float:
    """Mean cross-entropy over ``batches`` random batches of ``data`` (the batches
    ``minisparse.train.evaluate`` draws from the same rng)."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad(), _autocast(device):
        for _ in range(batches):
            x, y = (torch.from_numpy(a).to(device)
                    for a in get_batch(rng, data, batch, model.config["context"]))
            total += model(x, y)[1].item()
    return total / batches


def train(model_config=None, settings=None, *, text=None, data_path=None,
          out_dir="runs/default", resume=False, init_from=None, overwrite=False,
          progress=True, device=None) -> TrainResult:
    """``minisparse.train.train`` in PyTorch (same arguments but ``backend``): on every process
    of a torchrun launch, or alone. Rank 0 logs and writes ``out_dir/ckpt.npz``. ``device``:
    None picks this process's GPU if there is one (bf16 autocast), else the CPU."""
    rank, world, device = _start_processes(device)
    # rank 0 writes the checkpoint, so it holds out_dir like minisparse train (one run at once)
    with rundir.claim(out_dir) if rank == 0 else contextlib.nullcontext():
        return _train(rank, world, device, model_config, settings, text, data_path, out_dir,
                      resume, init_from, overwrite, progress)


def _train(rank, world, device, model_config, settings, text, data_path, out_dir, resume,
           init_from, overwrite, progress) -> TrainResult:
    if resume and init_from is not None:
        raise ValueError("use either resume or init_from, not both")
    ckpt_path = Path(out_dir) / CKPT_NAME
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"nothing to resume: no checkpoint at {ckpt_path}")
    if not resume and not overwrite and ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists: resume it (--resume), choose another output "
                         "directory (--out) or overwrite it (--overwrite)")
    base = load_checkpoint(ckpt_path if resume else init_from) if (resume or init_from) else None
    settings = _settings(settings, base.settings if resume else {})
    if settings.batch % world:
        raise ValueError(f"batch {settings.batch} must split evenly over {world} processes")
    text, source = resolve_text(text, data_path, base.data if resume else {})
    tokenizer = CharTokenizer(base.vocab) if base else CharTokenizer.from_text(text)
    config = _config(model_config, base, resume, tokenizer.vocab_size)
    data = make_dataset(text, config.context, tokenizer)
    data_info = {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    if resume and base.data.get("sha256") not in (None, data_info["sha256"]):
        raise DataError(f"the data differs from the data {ckpt_path} was trained on "
                        f"({base.data.get('source')})")

    rng = np.random.default_rng(settings.seed)
    model = GPT(config, rng, ste=settings.ste).to(device)
    names = [n for n, _ in sorted(model.named_parameters(), key=_spec_order(config))]
    optimizer = _adamw(model, names, settings)
    step, history = 0, {"train_loss": [], "val_loss": []}
    if base is not None:
        model.load_spec_state_dict({n: torch.from_numpy(a) for n, a in base.params.items()})
    if resume:
        if base.optimizer is None or base.rng_state is None:
            raise CheckpointError(f"{ckpt_path} has no optimizer or RNG state to resume from; "
                                  "start a new run from it with init_from (--init-from)")
        _load_engine_adamw(optimizer, base.optimizer)
        rng.bit_generator.state = base.rng_state
        step, history = base.step, base.history
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=model.config["ffn"] == "moe")  # idle experts

    diverged_above = DIVERGED * math.log(config.vocab_size)

    def save():
        """Write the checkpoint if the state is sane; else return why not (and write nothing).
        Rank 0 checks and writes; every rank returns its verdict."""
        nonlocal saved_step
        problem = None
        if rank == 0:
            params = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
            optimizer_state = _engine_adamw(optimizer)
            problem = _diverged(params, optimizer_state,
                                lambda: _engine_val_loss(config, params, data.val, settings),
                                diverged_above)
            if problem is None:
                save_checkpoint(ckpt_path, Checkpoint(
                    config=config, params=params, vocab=tokenizer.vocab,
                    step=step, optimizer=optimizer_state,
                    rng_state=rng.bit_generator.state, settings=settings.to_dict(),
                    data=data_info, history=history))
        problem = _from_rank_0(problem, world)
        if problem is None:
            saved_step = step
        return problem

    def validate(batches):
        loss = float("nan")
        if rank == 0:
            model.eval()
            loss = evaluate(model, data.val, np.random.default_rng(settings.eval_seed),
                            batches, settings.batch)
            model.train()
            history["val_loss"].append([step, loss])
            log.write(f"step {step}: val loss {loss:.4f}")
        return loss

    def stop(problem):
        result.stopped = _stop_reason(problem, ckpt_path, saved_step)

    result = TrainResult(config, settings, step)
    saved_step = step if resume else None  # step of the last checkpoint of this run
    rows = slice(rank * settings.batch // world, (rank + 1) * settings.batch // world)
    train_time, train_tokens = 0.0, 0
    with _Signals() as signals, _Progress(progress and rank == 0, settings, step) as log:
        while step < settings.iters:
            # every rank stops at the same step (a signal may reach only some of them)
            if _any_process(signals.received is not None, world, device):
                problem = save()
                if problem is not None:
                    stop(f"{problem} at step {step}")
                    break
                result.signal = signals.received or signal.SIGINT
                result.stopped = f"interrupted at step {step}; checkpoint saved to {ckpt_path}"
                break
            t0 = time.perf_counter()
            x, y = get_batch(rng, data.train, settings.batch, config.context)  # global batch
            x, y = (torch.from_numpy(a[rows]).to(device) for a in (x, y))  # this rank's rows
            with _autocast(device):
                _, loss = ddp(x, y)
            loss_value = _mean_over_processes(loss.detach(), world)
            if not math.isfinite(loss_value) or loss_value > diverged_above:
                stop(f"loss is {loss_value} at step {step + 1}")  # every rank: the mean loss
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: every rank ends with the mean gradient of the global batch
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            lr = lr_at(step, max_iters=settings.iters, lr=settings.lr, min_lr=settings.min_lr,
                       warmup=settings.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                optimizer.step()
            except RuntimeError as e:
                # torch refuses a step size lr / (1 - beta1^t) beyond the parameters' float
                # range (the NumPy engine takes it and its guard then finds infinities)
                if "overflow" not in str(e):
                    raise
                stop(f"the AdamW update of step {step + 1} overflows the parameters' float "
                     f"type (lr {lr:g})")
                break
            step += 1
            history["train_loss"].append(loss_value)
            train_time += time.perf_counter() - t0
            train_tokens += settings.batch * config.context
            log.step(step, loss_value, train_tokens / train_time)
            if not end_of_step(step, settings, result, validate, save, stop):
                break
    if world > 1:
        torch.distributed.barrier()  # rank 0's checkpoint is on disk before anyone returns
    return result.finish(step, history, ckpt_path, train_tokens, train_time)


def _engine_val_loss(config, params: dict, val: np.ndarray, settings) -> float:
    """The loss of one validation batch as ``minisparse eval`` computes it from these arrays
    (the NumPy engine). The divergence guard asks the engine, not PyTorch: PyTorch's kernels
    turn some overflowed states (weights of 1e37) into a uniform guess, loss ln V, which the
    guard would pass, where the engine -- and so eval of the checkpoint -- gives NaN."""
    engine = EngineGPT.from_params(config, params, backend="numpy")
    with np.errstate(over="ignore", invalid="ignore"):  # the guard reports it in one line
        return engine_evaluate(engine, val, np.random.default_rng(settings.eval_seed), 1,
                               settings.batch)


def _start_processes(device=None):
    """(rank, world size, device); joins the torchrun process group when launched by it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if world == 1:
        return 0, 1, device
    if cuda:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), world, device


def _autocast(device):
    """bf16 autocast on a GPU; full precision on the CPU (where bf16 matmuls are slow)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _any_process(flag: bool, world: int, device) -> bool:
    """True if ``flag`` is set on any process (on one process: the flag)."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _from_rank_0(value, world: int):
    """Rank 0's ``value`` (a small picklable object) on every process."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _mean_over_processes(loss, world) -> float:
    if world > 1:
        loss = loss.clone()
        torch.distributed.all_reduce(loss)
        loss /= world
    return loss.item()


def _spec_order(config):
    """Sort key: a parameter's position in SPEC 6's list (the engine's parameter order)."""
    position = {n: i for i, n in enumerate(param_shapes(config))}

    def key(item):
        name = item[0]
        if name not in position:
            raise ValueError(f"parameter {name!r} is not in this minisparse's SPEC names")
        return position[name]

    return key


def _adamw(model, names, settings):
    """SPEC 9's AdamW: weight decay on matrices, none on norm gains; the groups list the
    parameters in the engine's order, so the moments map onto its optimizer state."""
    params = dict(model.named_parameters())
    ordered = [params[n] for n in names]
    return torch.optim.AdamW(
        [{"params": [p for p in ordered if p.ndim == 2], "weight_decay": settings.weight_decay},
         {"params": [p for p in ordered if p.ndim != 2], "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps)


def _optimizer_order(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def _engine_adamw(optimizer) -> dict:
    """The torch AdamW moments as ``minisparse.optim.AdamW.state_dict()``: m.i, v.i, step.i
    over the parameters in group order (the update rules are the same)."""
    out = {}
    for i, p in enumerate(_optimizer_order(optimizer)):
        s = optimizer.state.get(p)
        if s:
            out[f"m.{i}"] = s["exp_avg"].detach().cpu().numpy().copy()
            out[f"v.{i}"] = s["exp_avg_sq"].detach().cpu().numpy().copy()
            out[f"step.{i}"] = int(s["step"])
    return out


def _load_engine_adamw(optimizer, state: dict) -> None:
    for i, p in enumerate(_optimizer_order(optimizer)):
        if f"step.{i}" in state:
            optimizer.state[p] = {
                "step": torch.tensor(float(state[f"step.{i}"])),
                "exp_avg": torch.from_numpy(np.asarray(state[f"m.{i}"])).to(p),
                "exp_avg_sq": torch.from_numpy(np.asarray(state[f"v.{i}"])).to(p)}


def main(argv=None) -> int:
    """``minisparse train``'s command line, run by this trainer; returns the exit code."""
    from .. import cli

    try:
        args = cli.build_parser().parse_args(["train", *(sys.argv[1:] if argv is None
                                                          else argv)])
        if args.backend is not None:
            raise cli.UsageError("--backend picks a NumPy implementation; the PyTorch trainer "
                                 "has none")
        settings = {k: v for k, v in vars(args).items() if k in cli.SETTING_FLAGS}
        result = train(cli._model_overrides(args), settings, data_path=args.data,
                       out_dir=args.out, resume=args.resume, init_from=args.init_from,
                       overwrite=args.overwrite, progress=not args.quiet)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except cli.UsageError as e:
        cli._error(str(e))
        return 2
    except (ValueError, OSError) as e:
        cli._error(str(e))
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.stopped is not None and result.stopped.startswith("interrupted"):
        print(f"minisparse: {result.stopped}; continue with: python -m minisparse.torch.train "
              f"--resume --out {args.out}", file=sys.stderr)
        return 128 + int(result.signal)  # 130 for Ctrl-C, 143 for SIGTERM, as minisparse train
    if result.stopped is not None:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stopped for rank 0's reason
            cli._error(result.stopped)
        return 1
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.step} steps, val loss {result.final_val_loss:.4f}, "
              f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
