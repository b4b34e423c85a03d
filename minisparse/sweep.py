"""Sweeps and ablations: grids of tiny models, the scaling-law fit (SPEC §8), paper ablations.

A sweep trains every (size, sparsity, bits, seed) of a `Grid` with `minisparse.train.train`,
one directory per run under ``OUT/runs/`` and one CSV row per finished run in
``OUT/results.csv``. It is resumable at two levels: a run already in the CSV is skipped, and
an interrupted run continues from its checkpoint. `fit_rows` then fits
``L(N, S) = E + (B + C exp(beta / (1 - S))) / N^alpha`` per bits setting (N = all parameters,
S = overall sparsity, SPEC §7) and `plot_sweep` draws data, fit and S*.

The ablations (`ablation_runs`) are presets of the same machinery:
``ste``       top-K with STE vs without (masked gradient, eq. 12) vs ReLU-only (paper Figs 8-9);
``block``     Block Q-Sparse N:M = 16:32 vs top-K at the same 50% sparsity (paper Fig 7);
``continue``  dense pre-training continued with Q-Sparse vs Q-Sparse from scratch (§4.2);
``moe``       the GLU vs a mixture of 4 GLU experts, top-1, same active parameters per token
              (each expert as wide as the GLU), both top-K 0.5 (SPEC §6): loss, N, N_a, load;
``threshold`` the dense model made sparse without training (SPEC §11 thresholds calibrated at
              S = 0.25 ... 0.7) vs Q-Sparse trained at the same S: val loss vs measured sparsity.
"""

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibrate import calibrate
from .checkpoint import load_checkpoint
from .data import CharTokenizer, get_batch, make_dataset
from .model import GPT, GPTConfig, count_params
from .scaling import ScalingFit, fit_scaling_law
from .tensor import no_grad
from .train import CKPT_NAME, TrainSettings, evaluate, resolve_text, train

RESULTS = "results.csv"
SPARSITY_LOG = "act_sparsity.jsonl"  # per run: activation sparsity at every evaluation
FIELDS = ("run", "variant", "d_model", "n_layers", "n_heads", "ffn_hidden", "context",
          "sparsity", "block", "bits", "ste", "ffn_act", "init_from", "iters", "batch", "lr",
          "seed", "N", "N_a", "S", "val_loss", "act_sparsity", "wall_s", "tokens_per_s", "stopped")


@dataclass(frozen=True)
class Run:
    """One training run: GPTConfig overrides, TrainSettings overrides, its start and name."""

    variant: str  # a label: the grid point ("d64-l2-s0.5-fp-seed0") or the ablation arm
    config: dict
    settings: dict  # {"ste": False}: masked top-K gradient (eq. 12), the no-STE ablation
    init_from: str | None = None  # name of an earlier run of the same sweep to start from

    @property
    def name(self) -> str:
        """variant + a hash of everything that defines the run, so changed settings rerun."""
        # ste hashed apart from the other settings, where it used to be, keeping earlier names
        settings = {k: v for k, v in self.settings.items() if k != "ste"}
        ste = self.settings.get("ste", True)
        spec = json.dumps([self.config, settings, ste, self.init_from], sort_keys=True)
        return f"{self.variant}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


@dataclass
class Grid:
    """The sweep grid: sizes (d_model, n_layers) x sparsities x bits x seeds, same recipe."""

    sizes: tuple = ((32, 1), (48, 1), (64, 2), (96, 2))
    sparsities: tuple = (0.0, 0.5, 0.7, 0.85)
    bits: tuple = (None,)  # None = full precision; 1.58 = BitNet b1.58
    seeds: tuple = (0,)
    iters: int = 300
    batch: int = 12
    context: int = 64
    lr: float = 1e-3
    final_eval_batches: int = 50
    extra: dict = field(default_factory=dict)  # further TrainSettings overrides

    def runs(self) -> list[Run]:
        out = []
        for d_model, n_layers in self.sizes:
            for sparsity in self.sparsities:
                for bits in self.bits:
                    for seed in self.seeds:
                        config = dict(d_model=d_model, n_layers=n_layers,
                                      n_heads=heads_for(d_model), context=self.context,
                                      sparsity=sparsity, bits=bits)
                        variant = (f"d{d_model}-l{n_layers}-s{sparsity:g}-"
                                   f"{'b1.58' if bits else 'fp'}-seed{seed}")
                        out.append(Run(variant, config, self.settings(seed)))
        return out

    def settings(self, seed: int, iters: int | None = None) -> dict:
        """TrainSettings overrides: a short recipe with ~10% warm-up and only a final eval."""
        iters = self.iters if iters is None else iters
        return {"iters": iters, "batch": self.batch, "lr": self.lr, "seed": seed,
                "min_lr": self.lr / 10, "warmup": min(100, iters // 10),
                "eval_interval": max(1, iters // 5), "eval_batches": 5,
                "final_eval_batches": self.final_eval_batches,
                "ckpt_interval": max(1, iters // 4), **self.extra}


def heads_for(d_model: int) -> int:
    """Heads of size 32 (the SPEC §9 recipe's 128/4), one head below d_model = 64."""
    return max(1, d_model // 32)


def activation_sparsity(model: GPT, batches) -> float:
    """Measured overall sparsity 1 - sum_p nnz_p D_out,p / sum_p D_in,p D_out,p over every
    projection call p (nnz_p: mean nonzeros per token of the input p multiplies, sparsify(A(X)),
    SPEC §5, §7) on token batches idx (B, T). Counts top-K zeros and natural ones (relu², int8
    rounding), so a dense relu² model is not 0."""
    record = []

    def observe(a, d_in, d_out):  # a = sparsify(A(X)) [..., D_in]
        record.append((a.size // d_in, np.count_nonzero(a), d_in, d_out))

    model.observe(observe)
    try:
        with no_grad():
            for idx in batches:
                model(idx)
    finally:
        model.observe(None)
    active = sum(nnz / rows * d_out for rows, nnz, _, d_out in record)
    return 1.0 - active / sum(d_in * d_out for _, _, d_in, d_out in record)


def _val_batches(text, data_path, context: int, n: int = 2, batch: int = 12, seed: int = 0):
    """n fixed validation batches idx (batch, context) of the run's text, for measuring."""
    text, _ = resolve_text(text, data_path, {})
    data = make_dataset(text, context)
    rng = np.random.default_rng(seed)
    return [get_batch(rng, data.val, batch, context)[0] for _ in range(n)]


def read_sparsity_log(run_dir) -> list[tuple[int, float]]:
    """(step, activation sparsity) pairs of RUN_DIR/act_sparsity.jsonl, one per evaluated step
    (a step evaluated again after a resume keeps its last value); [] if there is none."""
    path = Path(run_dir) / SPARSITY_LOG
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry["act_sparsity"]
    return sorted(by_step.items())


# ---------------------------------------------------------------------------------------------
# Running: one run, then many with a CSV of results


def read_rows(path) -> list[dict]:
    """Rows of a results CSV (numbers parsed); [] if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise ValueError(f"{path} is not a minisparse results CSV (columns "
                             f"{reader.fieldnames}, expected {list(FIELDS)})")
        return [{k: _parse(v) for k, v in row.items()} for row in reader]


def _parse(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"": None, "True": True, "False": False}.get(text, text)


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def run_one(run: Run, out_dir, *, text=None, data_path=None, progress=False) -> dict:
    """Train `run` in OUT/runs/NAME (continuing its checkpoint if there is one); its CSV row.

    Raises KeyboardInterrupt if training was interrupted (its checkpoint is saved).
    """
    out_dir = Path(out_dir)
    run_dir = out_dir / "runs" / run.name
    resume = (run_dir / CKPT_NAME).exists()
    init_from = None
    if run.init_from is not None and not resume:
        init_from = out_dir / "runs" / run.init_from / CKPT_NAME
    context = GPTConfig.from_dict({"vocab_size": 1, **run.config}).context
    batches = _val_batches(text, data_path, context)
    run_dir.mkdir(parents=True, exist_ok=True)

    def log_sparsity(step, model):  # activation sparsity over training (paper Figs 8-9)
        entry = {"step": step, "act_sparsity": activation_sparsity(model, batches)}
        with (run_dir / SPARSITY_LOG).open("a") as f:
            f.write(json.dumps(entry) + "\n")

    t0 = time.perf_counter()
    result = train(run.config, run.settings, text=text, data_path=data_path,
                   out_dir=run_dir, resume=resume, init_from=init_from, progress=progress,
                   callback=log_sparsity)
    wall = time.perf_counter() - t0
    if result.stopped is not None and result.stopped.startswith("interrupted"):
        raise KeyboardInterrupt(result.stopped)
    val = result.final_val_loss  # None only when the run stopped early
    counts = count_params(result.config)
    c = result.config
    measured = read_sparsity_log(run_dir)
    act = measured[-1][1] if result.stopped is None and measured else math.nan
    return {
        "run": run.name, "variant": run.variant, "d_model": c.d_model, "n_layers": c.n_layers,
        "n_heads": c.n_heads, "ffn_hidden": c.ffn_hidden, "context": c.context,
        "sparsity": c.sparsity, "block": "" if c.block is None else f"{c.block[0]}:{c.block[1]}",
        "bits": "" if c.bits is None else c.bits, "ste": result.settings.ste, "ffn_act": c.ffn_act,
        "init_from": run.init_from or "", "iters": result.settings.iters,
        "batch": result.settings.batch, "lr": result.settings.lr, "seed": result.settings.seed,
        "N": counts["N"], "N_a": counts["N_a"], "S": counts["sparsity"],
        "val_loss": math.nan if val is None else val, "act_sparsity": act,
        "wall_s": round(wall, 2), "tokens_per_s": round(result.tokens_per_second),
        "stopped": result.stopped or "",
    }


def run_all(runs: list[Run], out_dir, *, text=None, data_path=None, progress=False,
            log=print) -> list[dict]:
    """Run every run not yet in OUT/results.csv, appending a row as each finishes; return the
    rows of `runs` in order (from the CSV or new)."""
    for run in runs:  # bad grid values fail here, before hours of training
        GPTConfig.from_dict({"vocab_size": 1, **run.config})
        TrainSettings.from_dict(run.settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS
    done = {row["run"]: row for row in read_rows(path)}
    rows = []
    for i, run in enumerate(runs, 1):
        if run.name in done:
            log(f"[{i}/{len(runs)}] {run.variant}: in {path}, skipped")
        else:
            log(f"[{i}/{len(runs)}] {run.variant}: training")
            row = run_one(run, out_dir, text=text, data_path=data_path, progress=progress)
            _append_row(path, row)
            row = {k: _parse(str(v)) for k, v in row.items()}  # as read_rows will see it
            done[run.name] = row
            log(f"[{i}/{len(runs)}] {run.variant}: val loss {row['val_loss']:.4f}, "
                f"{row['wall_s']:.0f} s" + (f" ({row['stopped']})" if row["stopped"] else ""))
        rows.append(done[run.name])
    return rows


# ---------------------------------------------------------------------------------------------
# Fit and report


def fit_rows(rows: list[dict]) -> dict:
    """Fit the SPEC §8 law to finished rows, one fit per bits setting ("fp" / "1.58").

    -> {bits label: ScalingFit or an error message (too few points / sizes / sparsities)}.
    """
    fits = {}
    for label, group in _by_bits(rows).items():
        N = np.array([r["N"] for r in group], float)
        S = np.array([r["S"] for r in group], float)
        L = np.array([r["val_loss"] for r in group], float)
        if len(group) < 5 or len(set(N)) < 2 or len(set(S)) < 2:
            fits[label] = (f"not fitted: {len(group)} finished runs over {len(set(N))} sizes "
                           f"and {len(set(S))} sparsities; need >= 5 runs, >= 2 of each")
        else:
            fits[label] = fit_scaling_law(N, S, L)
    return fits


def _by_bits(rows) -> dict:
    groups = {}
    for r in rows:
        if isinstance(r["val_loss"], float) and math.isfinite(r["val_loss"]):
            groups.setdefault("1.58" if r["bits"] else "fp", []).append(r)
    return groups


def format_report(rows: list[dict], fits: dict) -> str:
    """A plain-text table of the runs and the fitted constants with S*."""
    lines = [f"{'run':<28} {'N':>9} {'N_a':>9} {'S':>6} {'val loss':>9} {'act sp.':>8} "
             f"{'time':>7}"]
    for r in rows:
        lines.append(f"{r['variant']:<28} {r['N']:>9,} {r['N_a']:>9,} {r['S']:>6.3f} "
                     f"{r['val_loss']:>9.4f} {r['act_sparsity']:>8.3f} {r['wall_s']:>6.0f}s")
    for label, fit in fits.items():
        if isinstance(fit, str):
            lines.append(f"[{label}] {fit}")
            continue
        lines.append(f"[{label}] E={fit.E:.4g} B={fit.B:.4g} C={fit.C:.4g} "
                     f"alpha={fit.alpha:.4g} beta={fit.beta:.4g} "
                     f"(Huber objective {fit.objective:.3g})")
        try:
            lines.append(f"[{label}] S* = {fit.optimal_sparsity():.2%}")
        except ValueError as e:
            lines.append(f"[{label}] S*: {e}")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], fits: dict, path) -> None:
    """PNG: val loss vs N per sparsity with the fitted L(N, S) (left); fitted L(N_a, S) vs S
    at the measured N_a, with S* marked (right). One row of panels per bits setting."""
    plt = _pyplot()
    groups = _by_bits(rows)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
    for (label, group), (left, right) in zip(groups.items(), axes, strict=True):
        fit = fits.get(label)
        fitted = isinstance(fit, ScalingFit)
        # one series per configured sparsity; its overall S differs a little between sizes
        # (K = ceil((1 - S) D)), so each curve uses the series' mean overall S
        for i, nominal in enumerate(sorted({r["sparsity"] for r in group})):
            series = sorted((r["N"], r["val_loss"], r["S"]) for r in group
                            if r["sparsity"] == nominal)
            n, loss, overall = np.array(series).T
            left.plot(n, loss, "o", color=f"C{i}",
                      label=f"sparsity {nominal:g} (S = {overall.mean():.3f})")
            if fitted:
                n = np.geomspace(n[0] / 1.5, n[-1] * 1.5, 100)
                left.plot(n, fit.loss(n, overall.mean()), "-", color=f"C{i}", alpha=0.6)
        left.set(xscale="log", xlabel="N (parameters)", ylabel="validation loss",
                 title=f"{label}: loss vs size")
        left.legend(fontsize=8)
        if fitted:
            s_star = _s_star(fit)
            s = np.linspace(0, min(0.95, max(r["S"] for r in group) + 0.05,
                                   1.0 if s_star is None else s_star + 0.1), 300)
            for n_a in sorted({r["N_a"] for r in group})[:: max(1, len(group) // 4)]:
                right.plot(s, fit.loss_active(n_a, s), label=f"N_a = {n_a:,}")
            if s_star is not None:
                right.axvline(s_star, color="k", ls="--", label=f"S* = {s_star:.1%}")
            right.set(xlabel="S", ylabel="fitted L(N_a, S)", title=f"{label}: fixed N_a")
            right.legend(fontsize=8)
        else:
            right.text(0.5, 0.5, str(fit), ha="center", va="center", wrap=True)
            right.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    """matplotlib.pyplot on the Agg backend (matplotlib is only in the dev/lessons extras)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'minisparse[lessons]' "
                         "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_sweep(grid: Grid, out_dir, *, text=None, data_path=None, plot=True, progress=False,
              log=print) -> tuple[list[dict], dict]:
    """Train the grid (resumably), fit the law per bits setting, write OUT/fit.json (and
    OUT/scaling.png); -> (rows, fits)."""
    out_dir = Path(out_dir)
    rows = run_all(grid.runs(), out_dir, text=text, data_path=data_path, progress=progress,
                   log=log)
    fits = fit_rows(rows)
    (out_dir / "fit.json").write_text(json.dumps(
        {k: v if isinstance(v, str) else {**v.__dict__, "S_star": _s_star(v)}
         for k, v in fits.items()}, indent=2))
    log(format_report(rows, fits))
    if plot:
        plot_sweep(rows, fits, out_dir / "scaling.png")
        log(f"plot: {out_dir / 'scaling.png'}")
    return rows, fits


def _s_star(fit: ScalingFit):
    try:
        return fit.optimal_sparsity()
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Ablations (paper section 4.2, Figs 7-9) as presets of runs

ABLATIONS = ("ste", "block", "continue", "moe", "threshold")
THRESHOLD_SPARSITIES = (0.25, 0.4, 0.5, 0.6, 0.7)


def ablation_runs(kind: str, *, d_model: int = 64, n_layers: int = 2, sparsity: float = 0.7,
                  iters: int = 600, seed: int = 0, batch: int = 12, context: int = 64,
                  lr: float = 1e-3) -> list[Run]:
    """The arms of one ablation, all of one size and recipe (relu² GLU, as the paper).

    ste:      top-K S with STE (eq. 13) | top-K S with masked gradient (eq. 12) | ReLU-only
              (dense; its only zeros are the relu² gate's).
    block:    dense | top-K 50% | block 16:32 (50%); ffn_hidden rounded to a multiple of 32.
    continue: dense | top-K S from scratch | dense for iters//2 then top-K S for the rest
              (fresh optimizer, SPEC §9 schedule over the second part).
    moe:      GLU top-K 0.5 | MoE of 4 experts, top-1, top-K 0.5; every expert as wide as the
              GLU, so a token activates the same projection weights (plus a 4 x d router).
    threshold: dense | top-K S for S in THRESHOLD_SPARSITIES; run_ablation then calibrates the
              dense model's thresholds at each S (``threshold_arms``).
    """
    if kind not in ABLATIONS:
        raise ValueError(f"ablation must be one of {list(ABLATIONS)}, got {kind!r}")
    grid = Grid(iters=iters, batch=batch, context=context, lr=lr)
    base = dict(d_model=d_model, n_layers=n_layers, n_heads=heads_for(d_model),
                context=context, ffn_act="relu2")
    settings = grid.settings(seed)
    if kind == "ste":
        return [Run("topk-ste", {**base, "sparsity": sparsity}, settings),
                Run("topk-no-ste", {**base, "sparsity": sparsity}, {**settings, "ste": False}),
                Run("relu-only", base, settings)]
    if kind == "block":
        if d_model % 32:
            raise ValueError(f"block 16:32 needs d_model divisible by 32, got {d_model}")
        base["ffn_hidden"] = 32 * max(1, round(8 * d_model / 3 / 32))
        return [Run("dense", base, settings),
                Run("topk-0.5", {**base, "sparsity": 0.5}, settings),
                Run("block-16:32", {**base, "block": (16, 32)}, settings)]
    if kind == "moe":
        return [Run("glu-topk-0.5", {**base, "sparsity": 0.5}, settings),
                Run("moe-4x-top1-topk-0.5", {**base, "sparsity": 0.5, "ffn": "moe",
                                             "n_experts": 4, "top_experts": 1}, settings)]
    if kind == "threshold":
        return [Run("dense", base, settings)] + [
            Run(f"topk-{s:g}", {**base, "sparsity": s}, settings) for s in THRESHOLD_SPARSITIES]
    pre = Run("dense-pretrain", base, grid.settings(seed, iters // 2))
    return [Run("dense", base, settings),
            Run("topk-scratch", {**base, "sparsity": sparsity}, settings),
            pre,
            Run("dense-then-topk", {**base, "sparsity": sparsity},
                grid.settings(seed, iters - iters // 2), init_from=pre.name)]


def run_ablation(kind: str, out_dir, *, text=None, data_path=None, plot=True, progress=False,
                 log=print, **options) -> list[dict]:
    """Train the arms of ablation `kind` (resumably) into OUT; report and plot OUT/KIND.png."""
    out_dir = Path(out_dir)
    runs = ablation_runs(kind, **options)
    rows = run_all(runs, out_dir, text=text, data_path=data_path, progress=progress, log=log)
    log(format_report(rows, {}))
    if kind in ("moe", "threshold"):
        arms = (moe_arms if kind == "moe" else threshold_arms)(runs, rows, out_dir, text=text,
                                                               data_path=data_path)
        (out_dir / f"{kind}.json").write_text(json.dumps(arms, indent=2))
        table = (moe_table if kind == "moe" else threshold_table)(arms)
        (out_dir / f"{kind}.md").write_text(table + "\n")
        log(table)
    if plot:
        (plot_threshold(arms, out_dir) if kind == "threshold" else
         plot_ablation(kind, runs, out_dir))
        log(f"plot: {out_dir / (kind + '.png')}")
    return rows


def _final_model(out_dir, run: Run) -> tuple:
    """(checkpoint, model) of a finished run."""
    ckpt = load_checkpoint(Path(out_dir) / "runs" / run.name / CKPT_NAME)
    return ckpt, GPT.from_params(ckpt.config, ckpt.params)


def moe_arms(runs, rows, out_dir, *, text=None, data_path=None) -> list[dict]:
    """Per arm: val loss, N, N_a and (MoE) the fraction of validation tokens per expert."""
    arms = []
    for run, row in zip(runs, rows, strict=True):
        _, model = _final_model(out_dir, run)
        batches = _val_batches(text, data_path, model.config.context)
        load = None
        if model.config.ffn == "moe":
            with no_grad():
                model(np.concatenate(batches))
            load = model.expert_load()
        arms.append({"variant": run.variant, "val_loss": row["val_loss"], "N": row["N"],
                     "N_a": row["N_a"], "expert_load": load})
    return arms


def moe_table(arms: list[dict]) -> str:
    lines = ["| arm | val loss | N | N_a | expert load (per layer: fraction of tokens) |",
             "| --- | --- | --- | --- | --- |"]
    for a in arms:
        load = "-" if a["expert_load"] is None else " / ".join(
            " ".join(f"{f:.2f}" for f in layer) for layer in a["expert_load"])
        lines.append(f"| {a['variant']} | {a['val_loss']:.4f} | {a['N']:,} | {a['N_a']:,} | "
                     f"{load} |")
    return "\n".join(lines)


def threshold_arms(runs, rows, out_dir, *, text=None, data_path=None) -> list[dict]:
    """The dense run calibrated at every S (OUT/calibrated/S.npz; validated like the trained
    runs: their final_eval_batches from their eval seed) next to the top-K runs trained at S."""
    dense_ckpt, _ = _final_model(out_dir, runs[0])
    text, _ = resolve_text(text, data_path, dense_ckpt.data)
    settings = TrainSettings.from_dict(dense_ckpt.settings)
    config = dense_ckpt.config
    data = make_dataset(text, config.context, CharTokenizer(dense_ckpt.vocab))
    batches = _val_batches(text, None, config.context)
    arms = [{"method": "dense", "S": 0.0, "val_loss": rows[0]["val_loss"],
             "act_sparsity": rows[0]["act_sparsity"]}]
    for run, row in zip(runs[1:], rows[1:], strict=True):
        s = run.config["sparsity"]
        ckpt, _ = calibrate(dense_ckpt, s, text, seed=settings.seed)
        model = GPT.from_params(ckpt.config, ckpt.params)
        loss = evaluate(model, data.val, np.random.default_rng(settings.eval_seed),
                        settings.final_eval_batches, settings.batch)
        arms.append({"method": "threshold", "S": s, "val_loss": loss,
                     "act_sparsity": activation_sparsity(model, batches)})
        arms.append({"method": "topk", "S": s, "val_loss": row["val_loss"],
                     "act_sparsity": row["act_sparsity"]})
    return arms


def threshold_table(arms: list[dict]) -> str:
    lines = ["| S | thresholds (no training): measured sparsity | val loss | "
             "top-K trained (Q-Sparse): measured sparsity | val loss |",
             "| --- | --- | --- | --- | --- |"]
    dense = arms[0]
    lines.append(f"| 0 (dense) | {dense['act_sparsity']:.3f} | {dense['val_loss']:.4f} | "
                 f"{dense['act_sparsity']:.3f} | {dense['val_loss']:.4f} |")
    for thr, topk in zip(arms[1::2], arms[2::2], strict=True):
        lines.append(f"| {thr['S']:g} | {thr['act_sparsity']:.3f} | {thr['val_loss']:.4f} | "
                     f"{topk['act_sparsity']:.3f} | {topk['val_loss']:.4f} |")
    return "\n".join(lines)


def plot_threshold(arms: list[dict], out_dir) -> None:
    """PNG OUT/threshold.png: val loss vs measured activation sparsity, thresholds vs top-K."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, method in enumerate(("threshold", "topk")):
        points = sorted((a["act_sparsity"], a["val_loss"]) for a in arms
                        if a["method"] in (method, "dense"))
        x, y = np.array(points).T
        ax.plot(x, y, "o-", color=f"C{i}", label={"threshold": "thresholds, no training",
                                                   "topk": "top-K trained (Q-Sparse, STE)"}[
                                                       method])
    ax.set(xlabel="measured activation sparsity", ylabel="validation loss",
           title="training-free thresholds vs Q-Sparse training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / "threshold.png", dpi=110)
    plt.close(fig)


def plot_ablation(kind: str, runs: list[Run], out_dir) -> None:
    """PNG OUT/KIND.png: training loss (moving average of up to 25 steps) and validation loss of
    every arm over its steps (left), measured activation sparsity at every evaluation (right,
    paper Figs 8-9); a continued run is drawn after the run it started from."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    fig, (ax, ax_sparsity) = plt.subplots(1, 2, figsize=(12, 4.5))
    offset = {}
    for i, run in enumerate(runs):
        run_dir = out_dir / "runs" / run.name
        history = load_checkpoint(run_dir / CKPT_NAME).history
        start = offset.get(run.init_from, 0)
        offset[run.name] = start + len(history["train_loss"])
        loss = np.asarray(history["train_loss"])
        w = max(1, min(25, len(loss) // 10))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        steps = start + np.arange(w, len(loss) + 1)
        ax.plot(steps, smooth, color=f"C{i}", label=f"{run.variant} (train)")
        if history["val_loss"]:
            vs, vl = np.array(history["val_loss"]).T
            ax.plot(start + vs, vl, "o--", color=f"C{i}", ms=3, alpha=0.7)
        measured = read_sparsity_log(run_dir)
        if measured:
            ms, sparsity = np.array(measured).T
            ax_sparsity.plot(start + ms, sparsity, "o-", color=f"C{i}", ms=3, label=run.variant)
    ax.set(xlabel="step", ylabel="loss (dots: validation)", title=f"ablation: {kind}")
    ax.legend(fontsize=8)
    ax_sparsity.set(xlabel="step", ylabel="activation sparsity", ylim=(0, 1),
                    title="measured activation sparsity (inputs of the projections)")
    ax_sparsity.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{kind}.png", dpi=110)
    plt.close(fig)
