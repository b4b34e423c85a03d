"""Training: the SPEC section 9 recipe as a plain loop, with checkpoints, resume and init-from.

All training randomness (parameter init, batch order) comes from one
``np.random.default_rng(seed)`` whose state is checkpointed, so a resumed run continues
bit-identically. Validation batches come from a fresh ``default_rng(eval_seed)`` at every
evaluation: every evaluation, of every run, sees the same batches.
"""

import dataclasses
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import rundir
from .backend import training_threads
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    param_count,
    remove_stale_temps,
    save_checkpoint,
)
from .data import (
    BUNDLED,
    CharTokenizer,
    DataError,
    bundled_text,
    get_batch,
    load_text,
    make_dataset,
)
from .model import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm, lr_at
from .tensor import no_grad

CKPT_NAME = "ckpt.npz"
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "ffn", "n_experts",
                "sparsify")


@dataclass
class TrainSettings:
    """Optimisation and bookkeeping settings; the defaults are the SPEC section 9 recipe."""

    iters: int = 2000
    batch: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay reaches this at the last step
    warmup: int = 100  # linear warm-up steps: lr * (it + 1) / (warmup + 1)
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices; norms get 0
    grad_clip: float = 1.0  # global grad-norm clip
    eval_interval: int = 250  # validate every N steps during training
    eval_batches: int = 20  # batches per validation during training
    final_eval_batches: int = 200  # batches for the final validation loss (SPEC section 9)
    ckpt_interval: int = 500  # checkpoint every N steps (and always at the end)
    log_interval: int = 50  # plain log line every N steps when stdout is not a terminal
    seed: int = 0
    eval_seed: int = 0
    ste: bool = True  # False: masked top-K gradient (Q-Sparse eq. 12) instead of the STE

    def __post_init__(self):
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, self.check(f.name, getattr(self, f.name)))
            except ValueError as e:
                raise ValueError(f"train setting {f.name} {e}") from None

    @classmethod
    def check(cls, name: str, value):
        """``value`` as setting ``name`` (int or float like its default), or a ValueError
        saying what it must be. The one place each setting is validated (the CLI uses it)."""
        kind = type(_DEFAULTS[name])
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value!r}")
        if kind is int and value != int(value):
            raise ValueError(f"must be an integer, got {value!r}")
        value = kind(value)
        low, high, low_open, high_open = _RANGES[name]
        if (value < low or (low_open and value == low)
                or (high is not None and (value > high or (high_open and value == high)))):
            if high is None:
                wanted = f"{'>' if low_open else '>='} {low}"
            else:
                wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"must be {wanted}, got {value!r}")
        return value

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
        """Build from a dict; unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown train settings {unknown}; valid settings are {names}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
MAX_BATCH = 4096  # a sanity bound: a batch beyond it is a typo, not a run that fits in memory
# setting -> (low, high, low excluded, high excluded); ste is a bool
_RANGES = {
    **{name: (0, None, True, False) for name in (
        "iters", "lr", "eval_interval", "eval_batches", "final_eval_batches", "ckpt_interval",
        "log_interval", "grad_clip", "eps")},
    "batch": (1, MAX_BATCH, False, False),
    **{name: (0, None, False, False) for name in (
        "min_lr", "warmup", "weight_decay", "seed", "eval_seed")},
    "beta1": (0, 1, False, True),
    "beta2": (0, 1, False, True),
}


@dataclass
class TrainResult:
    """What a run did: losses per step, validation losses, where the checkpoint is."""

    config: GPTConfig
    settings: TrainSettings
    step: int  # steps completed
    train_loss: list = field(default_factory=list)  # loss of step 1, 2, ..., step
    val_loss: list = field(default_factory=list)  # [step, loss] pairs
    final_val_loss: float | None = None  # over final_eval_batches; None if stopped early
    checkpoint: Path | None = None  # the last checkpoint written (None if none)
    stopped: str | None = None  # None if the run completed, else why it stopped
    signal: int | None = None  # the signal (SIGINT, SIGTERM, SIGHUP) that stopped the run
    tokens_per_second: float = 0.0

    def finish(self, step, history, ckpt_path, tokens, seconds) -> "TrainResult":
        """Fill in where the run ended: ``step``, the losses of ``history``, the checkpoint
        if one exists, and ``tokens / seconds`` of training."""
        if self.stopped is None and self.final_val_loss is None and history["val_loss"]:
            self.final_val_loss = history["val_loss"][-1][1]  # resumed a finished run
        self.step = step
        self.train_loss = list(history["train_loss"])
        self.val_loss = [list(p) for p in history["val_loss"]]
        self.checkpoint = ckpt_path if ckpt_path.exists() else None
        self.tokens_per_second = tokens / seconds if seconds else 0.0
        return self


def evaluate(model: GPT, data: np.ndarray, rng: np.random.Generator, batches: int,
             batch: int = 12) -> float:
    """Mean cross-entropy over ``batches`` random batches of ``data`` (no gradients)."""
    total = 0.0
    with no_grad():
        for _ in range(batches):
            x, y = get_batch(rng, data, batch, model.config.context)
            total += model(x, y)[1].item()
    return total / batches


def param_groups(model: GPT, weight_decay: float) -> list:
    """SPEC section 9: weight decay on matrices (ndim 2), none on norm gains."""
    params = [p for _, p in model.named_parameters()]
    return [
        {"params": [p for p in params if p.ndim == 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0},
    ]


def train(model_config=None, settings=None, *, text: str | None = None, data_path=None,
          out_dir="runs/default", resume: bool = False, init_from=None,
          overwrite: bool = False, backend: str | None = None,
          progress: bool = True, callback=None) -> TrainResult:
    """Train a GPT and checkpoint it to ``out_dir/ckpt.npz``.

    ``model_config``: a dict of GPTConfig fields (``vocab_size`` comes from the data) or a
    GPTConfig; ``settings``: a TrainSettings or a dict of overrides. The data is ``text``, or
    the file ``data_path``, or the bundled tiny Shakespeare.
    ``resume``: continue ``out_dir/ckpt.npz`` (its config, settings and data unless
    overridden; a different model config is an error). ``init_from``: start from that
    checkpoint's parameters with a fresh optimizer, changing any field that keeps the
    parameter shapes (sparsity, block, bits, rescale, ffn_act, context); the data defaults to
    the checkpoint's own (its vocabulary is kept either way).
    A fresh run refuses to replace an existing checkpoint unless ``overwrite``. ``backend``
    ("numpy" | "numba" | None = the kernels' default) picks the sparse_linear implementation.
    The run holds ``out_dir`` (another run on it is refused at once) and checks it is writable
    before the first step. Ctrl-C, SIGTERM or SIGHUP saves a checkpoint after the current step
    and returns (``TrainResult.signal`` says which). A diverging run (a non-finite loss or
    state, or a loss far above ln V) stops without overwriting the last good checkpoint; every
    checkpoint is verified (finite state, a sane loss on one validation batch) before it is
    written. Both are reported in ``TrainResult.stopped``. ``callback``, if given, is
    called as callback(step, model) after every validation (periodic and final).
    """
    if resume and init_from is not None:
        raise ValueError("use either resume or init_from, not both")
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CKPT_NAME
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"nothing to resume: no checkpoint at {ckpt_path}")
    with rundir.claim(out_dir):
        return _train(model_config, settings, text, data_path, ckpt_path, resume, init_from,
                      overwrite, backend, progress, callback)


def _train(model_config, settings, text, data_path, ckpt_path, resume, init_from, overwrite,
           backend, progress, callback) -> TrainResult:
    """``train`` once its output directory is held."""
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"nothing to resume: no checkpoint at {ckpt_path}")
    if not resume and not overwrite and ckpt_path.exists():
        raise ValueError(f"{ckpt_path} exists: resume it (--resume), choose another output "
                         "directory (--out) or overwrite it (--overwrite)")
    removed = remove_stale_temps(ckpt_path)
    if removed:
        print(f"minisparse: removed {len(removed)} unfinished checkpoint file(s) of an earlier "
              f"run killed while saving: {', '.join(removed)}", file=sys.stderr)
    base = load_checkpoint(ckpt_path if resume else init_from) if (resume or init_from) else None

    settings = _settings(settings, base.settings if resume else {})
    text, source = resolve_text(text, data_path, base.data if base else {})
    tokenizer = CharTokenizer(base.vocab) if base else CharTokenizer.from_text(text)
    config = _config(model_config, base, resume, tokenizer.vocab_size)
    _check_fits_in_memory(config)
    data = make_dataset(text, config.context, tokenizer)
    data_info = {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    if resume and base.data.get("sha256") not in (None, data_info["sha256"]):
        raise DataError(f"the data differs from the data {ckpt_path} was trained on "
                        f"({base.data.get('source')})")

    rng = np.random.default_rng(settings.seed)
    model = GPT(config, rng, backend=backend, ste=settings.ste)
    optimizer = AdamW(param_groups(model, settings.weight_decay), lr=settings.lr,
                      betas=(settings.beta1, settings.beta2), eps=settings.eps)
    step, history = 0, {"train_loss": [], "val_loss": []}
    if base is not None:
        model.load_state_dict(base.params)
    if resume:
        if base.optimizer is None or base.rng_state is None:
            raise CheckpointError(f"{ckpt_path} has no optimizer or RNG state to resume from; "
                                  "start a new run from it with init_from (--init-from)")
        if base.step > settings.iters:
            raise ValueError(f"{ckpt_path} is at step {base.step}, beyond iters={settings.iters}")
        optimizer.load_state_dict(base.optimizer)
        rng.bit_generator.state = base.rng_state
        step, history = base.step, base.history
    # a checkpoint holds the parameters and two AdamW moments, plus the meta
    rundir.check_free_space(ckpt_path.parent,
                            3 * sum(p.data.nbytes for _, p in model.named_parameters()) + 2**20)
    diverged_above = DIVERGED * math.log(config.vocab_size)

    def save():
        """Write the checkpoint if the state is sane; else return why not (and write nothing)."""
        nonlocal saved_step
        params, optimizer_state = model.state_dict(), optimizer.state_dict()
        problem = _diverged(params, optimizer_state, lambda: evaluate(
            model, data.val, np.random.default_rng(settings.eval_seed), 1, settings.batch),
            diverged_above)
        if problem is None:
            save_checkpoint(ckpt_path, Checkpoint(
                config=config, params=params, vocab=tokenizer.vocab, step=step,
                optimizer=optimizer_state, rng_state=rng.bit_generator.state,
                settings=settings.to_dict(), data=data_info, history=history))
            saved_step = step
        return problem

    def validate(batches):
        loss = evaluate(model, data.val, np.random.default_rng(settings.eval_seed), batches,
                        settings.batch)
        history["val_loss"].append([step, loss])
        log.write(f"step {step}: val loss {loss:.4f}")
        if config.ffn == "moe":  # fraction of the last validation batch's tokens per expert
            log.write("  expert load: " + " | ".join(
                " ".join(f"{f:.2f}" for f in layer) for layer in model.expert_load()))
        if callback is not None:
            callback(step, model)
        return loss

    def stop(problem):
        result.stopped = _stop_reason(problem, ckpt_path, saved_step)

    result = TrainResult(config, settings, step)
    saved_step = step if resume else None  # step of the last checkpoint of this run
    train_time, train_tokens = 0.0, 0
    # a diverging run overflows on its way to the guard, which reports it in one line: no
    # NumPy warnings on top
    with _Signals() as signals, _Progress(progress, settings, step) as log, \
            np.errstate(over="ignore", invalid="ignore"), training_threads(backend):
        while step < settings.iters:
            if signals.received:
                problem = save()
                if problem is not None:
                    stop(f"{problem} at step {step}")
                    break
                result.signal = signals.received
                result.stopped = (f"interrupted at step {step} "
                                  f"({signal.Signals(signals.received).name}); checkpoint saved "
                                  f"to {ckpt_path}")
                break
            t0 = time.perf_counter()
            x, y = get_batch(rng, data.train, settings.batch, config.context)
            _, loss = model(x, y)
            loss_value = loss.item()
            if not math.isfinite(loss_value) or loss_value > diverged_above:
                stop(f"loss is {loss_value} at step {step + 1}")
                break
            optimizer.zero_grad()
            loss.backward()
            clip_grad_norm(optimizer.params, settings.grad_clip)
            lr = lr_at(step, max_iters=settings.iters, lr=settings.lr, min_lr=settings.min_lr,
                       warmup=settings.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            step += 1
            history["train_loss"].append(loss_value)
            train_time += time.perf_counter() - t0
            train_tokens += x.size
            log.step(step, loss_value, train_tokens / train_time)
            if not end_of_step(step, settings, result, validate, save, stop):
                break
    return result.finish(step, history, ckpt_path, train_tokens, train_time)


def end_of_step(step, settings, result, validate, save, stop) -> bool:
    """After ``step``, as SPEC 9's schedule says: validate every eval_interval steps (the last
    step over final_eval_batches, into ``result``), save every ckpt_interval steps and at the
    end. False when the checkpoint could not be written: ``stop`` has the reason, the run ends.
    (Shared by both trainers, with their own validate / save / stop.)"""
    if step == settings.iters:
        result.final_val_loss = validate(settings.final_eval_batches)
    elif step % settings.eval_interval == 0:
        validate(settings.eval_batches)
    if step == settings.iters or step % settings.ckpt_interval == 0:
        problem = save()
        if problem is not None:
            stop(f"{problem} after step {step}")
            result.final_val_loss = None
            return False
    return True


def _check_fits_in_memory(config: GPTConfig) -> None:
    """Refuse a model whose parameters, gradients and two AdamW moments (float32) alone exceed
    the machine's memory, before allocating any of it."""
    numbers = param_count(config)[1]
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): let NumPy decide
        return
    if 16 * numbers > memory:
        raise ValueError(f"the model has {numbers:,} parameters: with gradients and AdamW "
                         f"state that is {16 * numbers / 2**30:,.1f} GB, more than this "
                         f"machine's {memory / 2**30:.1f} GB of memory")


DIVERGED = 10  # a loss above DIVERGED * ln V (uniform guessing) means the run has diverged


def _diverged(params: dict, optimizer_state: dict, val_loss, limit: float) -> str | None:
    """Why a training state must not be saved (a non-finite parameter or optimizer moment,
    or a non-finite or diverged loss on one validation batch), or None if it is sane.
    ``params`` and ``optimizer_state`` are the checkpoint's arrays (the engine's state dicts;
    the PyTorch trainer converts to them); ``val_loss()`` is the loss of one validation batch,
    computed only once the state is finite. Shared by both trainers."""
    for name, value in params.items():
        if not np.isfinite(value).all():
            return f"parameter {name} is not finite"
    for key, value in optimizer_state.items():
        if isinstance(value, np.ndarray) and not np.isfinite(value).all():
            return f"optimizer state {key} is not finite"
    loss = val_loss()
    if not math.isfinite(loss) or loss > limit:
        return f"the validation loss is {loss}"
    return None


def _stop_reason(problem: str, ckpt_path: Path, saved_step: int | None) -> str:
    """``TrainResult.stopped`` of a diverging run: what went wrong and which checkpoint is
    left (``saved_step``: the step of this run's last good checkpoint, None if none)."""
    kept = ("no checkpoint was written" if saved_step is None else
            f"kept the last good checkpoint {ckpt_path} (step {saved_step})")
    return f"{problem}; stopped and {kept}; a lower lr may help"


def _settings(settings, saved: dict) -> TrainSettings:
    if isinstance(settings, TrainSettings):
        return settings
    return TrainSettings.from_dict({**saved, **(settings or {})})


def resolve_text(text, data_path, saved: dict):
    """-> (text, source): ``text``, else the file ``data_path``, else the source recorded in a
    checkpoint's ``data`` dict ``saved``, else the bundled corpus."""
    if text is not None and data_path is not None:
        raise ValueError("give either text or data_path, not both")
    if text is not None:
        return text, "<text>"
    if data_path is None:
        data_path = saved.get("source", BUNDLED)
        if data_path == "<text>":
            raise DataError("the checkpoint was trained on in-memory text; pass that text "
                            "(or a file with it) again")
    if data_path == BUNDLED:
        return bundled_text(), BUNDLED
    return load_text(data_path), str(Path(data_path).resolve())


def _config(model_config, base: Checkpoint | None, resume: bool, vocab_size: int) -> GPTConfig:
    """The run's GPTConfig: overrides on top of the checkpoint's config (or the defaults)."""
    if isinstance(model_config, GPTConfig):
        model_config = model_config.to_dict()
    overrides = dict(model_config or {})
    if base is None:
        config = GPTConfig.from_dict({"vocab_size": vocab_size, **overrides})
        if config.vocab_size != vocab_size:
            raise ValueError(f"vocab_size {config.vocab_size} does not match the data's "
                             f"{vocab_size} characters")
        return config
    old = base.config.to_dict()
    new = GPTConfig.from_dict({**old, **overrides}).to_dict()
    fixed = SHAPE_FIELDS if not resume else tuple(old)  # resume: nothing may change
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in fixed if old[k] != new[k]]
    if changed:
        what = "resume with" if resume else "init from a checkpoint and change"
        raise ValueError(f"cannot {what} {', '.join(changed)}")
    return GPTConfig.from_dict(new)


class _Signals:
    """The first Ctrl-C (SIGINT), SIGTERM (``kill``, a job scheduler) or SIGHUP (a closed
    terminal) sets ``received`` to its number: the loop saves at the next step boundary, so
    the checkpoint is consistent. A second one raises KeyboardInterrupt at once."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP does not exist on Windows

    def __enter__(self):
        self.received = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    signum = getattr(signal, name)
                    self.previous[signum] = signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signum
        try:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(again to quit now)", file=sys.stderr, flush=True)
        except OSError:  # SIGHUP: the terminal may be gone
            pass

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        return False


class _Progress:
    """A tqdm bar on a terminal, plain log lines otherwise, nothing if disabled."""

    def __init__(self, enabled: bool, settings: TrainSettings, start: int):
        self.enabled, self.total, self.start = enabled, settings.iters, start
        self.interval = settings.log_interval
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = tqdm(total=settings.iters, initial=start, file=sys.stdout,
                            dynamic_ncols=True, unit="it")
        self.t0 = time.perf_counter()

    def step(self, step: int, loss: float, tokens_per_second: float):
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_second:,.0f} tok/s",
                                     refresh=False)
            self.bar.update(1)
        elif self.enabled and (step % self.interval == 0 or step == self.total):
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / (step - self.start) * (self.total - step)
            print(f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_second:,.0f} tok/s"
                  f" | eta {_duration(eta)}", flush=True)

    def write(self, message: str):
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
