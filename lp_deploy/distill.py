"""Stage ``distill``: refine the patch of a pruned checkpoint by offline knowledge distillation.

The dense model runs once over the distillation windows and its top-k next-token
probabilities are cached on disk (:mod:`lp_deploy.teacher`); the hidden state entering the
first patch is computed once per window and cached too (:mod:`lp_deploy.prefix`). Each step
then runs only from the patch to the logits of the teacher's k ids and minimises
``KL(teacher || student)`` over those ids. Only the patches train (:mod:`lp_deploy.trainable`):
AdamW, a cosine schedule down to ``lr * min_lr_ratio``, gradient clipping, fp32 on CPU and
bf16 autocast on CUDA, a validation split with early stopping (the best patch is kept), a
resumable state saved every epoch (:mod:`lp_deploy.train_state`). The result is a patched
checkpoint like the training-free one, with the settings and losses in its ``lp_deploy``
section.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lp_deploy.artifacts import Kind, check_out, clean_json
from lp_deploy.calibration import CalibrationSpec
from lp_deploy.checkpoint import load_patched, save_patched
from lp_deploy.errors import CheckpointError, LpDeployError
from lp_deploy.loading import load_model
from lp_deploy.model import LoadedModel
from lp_deploy.perplexity import PerplexitySpec, model_perplexity
from lp_deploy.prefix import (
    first_patch_position,
    prefix_digest,
    prefix_hidden,
    suffix_hidden,
    topk_kl,
    topk_logits,
)
from lp_deploy.shards import ShardReader, read_manifest, write_manifest, write_shards
from lp_deploy.teacher import (
    KEY_FIELDS,
    TeacherCache,
    build_cache,
    cache_key,
    check_cache,
    default_cache_dir,
    distill_windows,
)
from lp_deploy.train_state import TrainState, has_state, load_state, save_state
from lp_deploy.trainable import TRAIN_MODES, check_mode, export_patches, make_trainable

log = logging.getLogger(__name__)
SUMMARY = "distill.json"
PREFIX_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFIX_WINDOWS_PER_SHARD = 8


@dataclass
class DistillConfig:
    """Everything the ``distill`` stage needs; mirrors ``lp-deploy distill`` options."""

    patched: Path
    #: the recommended setting on a 2-core CPU: an ``lstsq`` checkpoint, 192 x 256 tokens,
    #: one epoch, lr 3e-4 (SmolLM2-135M, 5/30: 86% of the pruned-to-dense perplexity gap)
    data: CalibrationSpec = field(
        default_factory=lambda: CalibrationSpec("wikitext-2/valid.txt", 192, 256, 0)
    )
    out: Path | None = None
    overwrite: bool = False
    topk: int = 50
    epochs: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    min_lr_ratio: float = 1 / 20
    clip: float = 1.0
    train: str = "full"  # "full" | "diag"
    batch_size: int = 1
    val_fraction: float = 0.1
    patience: int = 1  # epochs without a better validation loss before stopping
    teacher_cache: Path | None = None  # None: under the lp-deploy cache, keyed by the inputs
    prefix_dtype: str = "float32"
    save_every: int = 0  # also save the state every N steps (0: each epoch only)
    resume: bool = False
    device: str = "auto"
    perplexity: PerplexitySpec | None = None  # measured on the distilled model
    progress: bool = True


@dataclass
class DistillResult:
    """The distilled model, its losses, timings and where it was written."""

    model: LoadedModel
    summary: dict[str, Any]
    out: Path | None = None


# --------------------------------------------------------------------------- checks


def validate_config(cfg: DistillConfig) -> None:
    """Reject bad options before any expensive work."""
    if cfg.train not in TRAIN_MODES:
        raise LpDeployError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {cfg.train!r}")
    if cfg.topk < 1 or cfg.epochs < 1 or cfg.batch_size < 1:
        raise LpDeployError("--topk, --epochs and --batch-size must be at least 1")
    if cfg.data.samples < 1 or cfg.data.seqlen < 2:
        raise LpDeployError(
            f"need --samples >= 1 and --seqlen >= 2, got --samples {cfg.data.samples} "
            f"--seqlen {cfg.data.seqlen}"
        )
    if not (cfg.lr > 0 and 0 <= cfg.val_fraction < 1 and 0 < cfg.min_lr_ratio <= 1):
        raise LpDeployError("need --lr > 0, 0 <= --val-fraction < 1, 0 < min_lr_ratio <= 1")
    _check_training_options(cfg)
    if cfg.prefix_dtype not in PREFIX_DTYPES:
        raise LpDeployError(f"--prefix-dtype must be one of {', '.join(PREFIX_DTYPES)}")
    if cfg.out is not None:
        check_out(cfg.out, Kind.CHECKPOINT, cfg.overwrite)


def _check_training_options(cfg: DistillConfig) -> None:
    bad = [
        f"{name} {value}"
        for name, value, ok in (
            ("--patience", cfg.patience, cfg.patience >= 1),
            ("--save-every", cfg.save_every, cfg.save_every >= 0),
            (
                "--weight-decay",
                cfg.weight_decay,
                math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
            ),
            ("clip", cfg.clip, math.isfinite(cfg.clip) and cfg.clip > 0),
        )
        if not ok
    ]
    if bad:
        raise LpDeployError(
            f"need --patience >= 1, --save-every >= 0 (0: each epoch only), --weight-decay >= 0 "
            f"and clip > 0 (a gradient-norm bound), got {', '.join(bad)}"
        )


def check_student(student: LoadedModel, cfg: DistillConfig) -> int:
    """The first patch position; errors for checkpoints distillation cannot train."""
    if student.meta.get("fold"):
        raise CheckpointError(
            f"{cfg.patched} is folded (its residual stream is rotated); distill the unfolded "
            "checkpoint written by 'lp-deploy patch', then fold the result"
        )
    position = first_patch_position(student.adapter)
    vocab = int(student.model.config.get_text_config().vocab_size)
    if cfg.topk > vocab:
        raise LpDeployError(f"--topk {cfg.topk} is above the vocabulary size {vocab}")
    check_mode(student.adapter, cfg.train)
    return position


def state_dir(cfg: DistillConfig) -> Path:
    """Where the prefix cache and the training state live while the stage runs."""
    base = Path(cfg.out if cfg.out is not None else cfg.patched)
    return base.parent / f".{base.name}.distill"


# --------------------------------------------------------------------------- caches


def _device(cfg: DistillConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _to_device(model: Any, device: torch.device) -> None:
    model.to(device)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _load_dense(cfg: DistillConfig, student: LoadedModel) -> LoadedModel:
    source = student.meta.get("source") or {}
    dense = load_model(source.get("source", ""))
    if source.get("sha256") and dense.source.get("sha256") != source["sha256"]:
        raise CheckpointError(
            f"the dense model {source.get('source')!r} has sha256 {dense.source.get('sha256')}, "
            f"but the checkpoint was pruned from {source['sha256']}"
        )
    _to_device(dense.model, _device(cfg))
    return dense


@dataclass
class Caches:
    """The teacher cache and the prefix cache of one run, and what building them took."""

    teacher: TeacherCache
    prefix: ShardReader
    built: list[str]


def _prefix_dir(cfg: DistillConfig) -> Path:
    return state_dir(cfg) / "prefix"


def _prefix_key(key: dict[str, Any], position: int, digest: str, dtype: str) -> dict[str, Any]:
    return {"teacher": key, "position": position, "weights": digest, "dtype": dtype}


def _existing_prefix(directory: Path, key: dict[str, Any]) -> ShardReader | None:
    manifest = read_manifest(directory, "prefix cache")
    if manifest is not None and manifest.get("key") == key:
        return ShardReader(directory, manifest["shards"])
    if manifest is not None:
        shutil.rmtree(directory)
    return None


@contextlib.contextmanager
def _prefix_writer(cfg: DistillConfig, key: dict[str, Any]) -> Iterator[Any]:
    with write_shards(_prefix_dir(cfg), PREFIX_WINDOWS_PER_SHARD) as writer:
        yield writer
        writer.flush()
        write_manifest(writer.directory, {"key": key, "shards": writer.shards})


def _build_both(
    cfg: DistillConfig,
    dense: LoadedModel,
    windows: torch.Tensor,
    key: dict[str, Any],
    directory: Path,
    position: int,
    pkey: dict[str, Any],
) -> tuple[TeacherCache, ShardReader]:
    """One dense pass fills both caches: the dense model's layers before the first gap are
    the student's prefix layers (same weights, checked by digest)."""
    layers = list(dense.adapter.layers)
    grabbed: list[torch.Tensor] = []
    dtype = PREFIX_DTYPES[cfg.prefix_dtype]
    hook = layers[position].register_forward_pre_hook(lambda _m, a: grabbed.append(a[0]))
    try:
        with _prefix_writer(cfg, pkey) as writer:
            manifest = build_cache(
                dense,
                windows,
                key,
                directory,
                cfg.data.data,
                cfg.progress,
                after_window=lambda: writer.add({"hidden": grabbed.pop()[0].to(dtype)}),
            )
    finally:
        hook.remove()
    return TeacherCache(directory, manifest), ShardReader(_prefix_dir(cfg), writer.shards)


def _student_prefix(
    cfg: DistillConfig,
    student: LoadedModel,
    teacher: TeacherCache,
    position: int,
    pkey: dict[str, Any],
) -> ShardReader:
    """The prefix states from the student's own first layers (teacher cache reused), on the
    run's device; the ids follow the student's own parameters."""
    _to_device(student.model, _device(cfg))
    device, dtype = _model_device(student.model), PREFIX_DTYPES[cfg.prefix_dtype]
    with _prefix_writer(cfg, pkey) as writer:
        for i in tqdm(range(len(teacher)), desc="prefix cache", disable=not cfg.progress):
            ids = teacher.window(i)["input_ids"].unsqueeze(0).to(device)
            writer.add({"hidden": prefix_hidden(student.adapter, ids, position)[0].to(dtype)})
    return ShardReader(_prefix_dir(cfg), writer.shards)


def build_caches(
    cfg: DistillConfig,
    student: LoadedModel,
    windows: torch.Tensor,
    key: dict[str, Any],
    position: int,
) -> Caches:
    """The matching teacher cache (the dense model runs once when it is absent) and the
    prefix cache (filled in the same dense pass when both are built)."""
    directory = Path(cfg.teacher_cache or default_cache_dir(key)).expanduser()
    digest = prefix_digest(student.adapter, position)
    pkey = _prefix_key(key, position, digest, cfg.prefix_dtype)
    prefix = _existing_prefix(_prefix_dir(cfg), pkey)
    manifest = check_cache(directory, key)
    if manifest is not None:
        teacher = TeacherCache(directory, manifest)
        if prefix is not None:
            return Caches(teacher, prefix, [])
        return Caches(teacher, _student_prefix(cfg, student, teacher, position, pkey), ["prefix"])
    dense = _load_dense(cfg, student)
    if prefix is None and prefix_digest(dense.adapter, position) == digest:
        teacher, prefix = _build_both(cfg, dense, windows, key, directory, position, pkey)
        return Caches(teacher, prefix, ["teacher", "prefix (same pass)"])
    teacher = TeacherCache(
        directory, build_cache(dense, windows, key, directory, cfg.data.data, cfg.progress)
    )
    del dense
    if prefix is None:
        prefix = _student_prefix(cfg, student, teacher, position, pkey)
        return Caches(teacher, prefix, ["teacher", "prefix"])
    return Caches(teacher, prefix, ["teacher"])


# --------------------------------------------------------------------------- training


@dataclass
class Batches:
    """Reads batches of prefix states and teacher targets from the two caches."""

    teacher: TeacherCache
    prefix: ShardReader
    device: torch.device
    dtype: torch.dtype

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden, ids, probs = [], [], []
        for i in indices:
            t = self.teacher.window(i)
            hidden.append(self.prefix.get(i, ("hidden",))["hidden"])
            ids.append(t["ids"])
            probs.append(t["probs"])
        return (
            torch.stack(hidden).to(self.device, self.dtype),
            torch.stack(ids).to(self.device),
            torch.stack(probs).to(self.device),
        )


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_loss(student: LoadedModel, position: int, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The distillation loss of one batch, from the prefix states (suffix only)."""
    hidden, ids, probs = batch
    with _autocast(hidden.device):
        final = suffix_hidden(student.adapter, hidden, position)
        logits = topk_logits(student.adapter, final, ids)
    return topk_kl(logits, probs)


def lr_at(cfg: DistillConfig, step: int, total: int) -> float:
    """Cosine from ``lr`` down to ``lr * min_lr_ratio`` over ``total`` steps."""
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


@torch.no_grad()
def evaluate(student: LoadedModel, position: int, data: Batches, indices: list[int]) -> float:
    if not indices:
        return float("nan")
    losses = [float(step_loss(student, position, data.get([i]))) for i in indices]
    return sum(losses) / len(losses)


def _after_step(state: TrainState) -> None:
    """Called after every optimiser step (tests use it to simulate a killed run)."""


@dataclass
class Trainer:
    """One distillation run: the student, its trainable patches, data, optimiser, state."""

    cfg: DistillConfig
    student: LoadedModel
    position: int
    data: Batches
    params: dict[int, torch.nn.Parameter]
    train_idx: list[int]
    val_idx: list[int]
    key: dict[str, Any]

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(
            list(self.params.values()), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.batches_per_epoch = math.ceil(len(self.train_idx) / self.cfg.batch_size)
        self.total = self.cfg.epochs * self.batches_per_epoch
        self.directory = state_dir(self.cfg)

    def _order(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.cfg.data.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.train_idx), generator=gen).tolist()
        order = [self.train_idx[i] for i in perm]
        bs = self.cfg.batch_size
        return [order[i : i + bs] for i in range(0, len(order), bs)]

    def _step(self, state: TrainState, batch: list[int]) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.cfg, state.step, self.total)
        self.opt.zero_grad(set_to_none=True)
        loss = step_loss(self.student, self.position, self.data.get(batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.clip)
        self.opt.step()
        return float(loss.detach())

    def _save(self, state: TrainState, best: dict[int, torch.Tensor]) -> None:
        save_state(self.directory, state, self.params, best, self.opt)

    def _snapshot(self) -> dict[int, torch.Tensor]:
        return {pos: p.detach().clone() for pos, p in self.params.items()}

    def _start(self) -> tuple[TrainState, dict[int, torch.Tensor]]:
        if self.cfg.resume:
            return load_state(self.directory, self.key, self.params, self.opt)
        state = TrainState(key=self.key)
        state.val_loss.append(evaluate(self.student, self.position, self.data, self.val_idx))
        return state, self._snapshot()

    def _end_epoch(self, state: TrainState, best: dict[int, torch.Tensor]) -> dict[int, Any]:
        state.train_loss.append(state.loss_sum / max(self.batches_per_epoch, 1))
        val = evaluate(self.student, self.position, self.data, self.val_idx)
        state.val_loss.append(val)
        state.epoch, state.batch, state.loss_sum = state.epoch + 1, 0, 0.0
        if not self.val_idx or val < min(state.val_loss[:-1]):
            best, state.best_epoch, state.bad_epochs = self._snapshot(), state.epoch, 0
        else:
            state.bad_epochs += 1
            state.stopped_early = state.bad_epochs >= self.cfg.patience
        self._save(state, best)
        return best

    def run(self) -> TrainState:
        state, best = self._start()
        bar = tqdm(
            total=self.total, initial=state.step, desc="distill", disable=not self.cfg.progress
        )
        while state.epoch < self.cfg.epochs and not state.stopped_early:
            for batch in self._order(state.epoch)[state.batch :]:
                loss = self._step(state, batch)
                state.step, state.batch, state.loss_sum = (
                    state.step + 1,
                    state.batch + 1,
                    state.loss_sum + loss,
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=state.epoch + 1)
                if self.cfg.save_every and state.step % self.cfg.save_every == 0:
                    self._save(state, best)
                _after_step(state)
            best = self._end_epoch(state, best)
        bar.close()
        with torch.no_grad():
            for pos, p in self.params.items():
                p.copy_(best[pos])
        return state


# --------------------------------------------------------------------------- the stage


class _Clock:
    """Wall and CPU seconds per phase, and the process's peak RSS."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.phases[name] = {
            "wall_s": round(time.perf_counter() - wall, 2),
            "cpu_s": round(time.process_time() - cpu, 2),
        }

    @staticmethod
    def peak_rss_mb() -> float:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    n_val = min(max(1, round(n * fraction)), n - 1) if fraction > 0 and n >= 2 else 0
    return list(range(n - n_val)), list(range(n - n_val, n))


def _run_key(cfg: DistillConfig, teacher_key: dict[str, Any], position: int) -> dict[str, Any]:
    skip = {"out", "overwrite", "resume", "progress", "perplexity", "teacher_cache", "device"}
    settings = {k: v for k, v in clean_json(asdict(cfg)).items() if k not in skip}
    return {"settings": settings, "teacher": teacher_key, "position": position}


def _prepare(cfg: DistillConfig) -> tuple[LoadedModel, int, torch.Tensor, dict[str, Any]]:
    """Everything that can fail on bad inputs, before anything is written."""
    validate_config(cfg)
    student = load_patched(cfg.patched)
    position = check_student(student, cfg)
    source = student.meta.get("source") or {}
    key = cache_key(source, cfg.data, cfg.topk)
    check_cache(Path(cfg.teacher_cache or default_cache_dir(key)).expanduser(), key)
    windows = distill_windows(student.tokenizer, cfg.data)
    if cfg.resume and not has_state(state_dir(cfg)):
        raise LpDeployError(
            f"--resume: no saved training state in {state_dir(cfg)}; run without --resume"
        )
    return student, position, windows, key


def _summary(
    cfg: DistillConfig,
    state: TrainState,
    teacher: TeacherCache,
    prefix: ShardReader,
    clock: _Clock,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return clean_json(
        {
            "config": asdict(cfg),
            "train": cfg.train,
            "samples_x_seqlen": [cfg.data.samples, cfg.data.seqlen],
            "steps": state.step,
            "epochs_run": state.epoch,
            "train_loss": state.train_loss,
            "val_loss": state.val_loss,
            "best_epoch": state.best_epoch,
            "stopped_early": state.stopped_early,
            "teacher_cache": {
                "dir": str(teacher.directory),
                "bytes": teacher.size_bytes(),
                **{k: teacher.manifest[k] for k in KEY_FIELDS},
            },
            "prefix_cache_bytes": prefix.size_bytes(),
            "phases": clock.phases,
            "peak_rss_mb": clock.peak_rss_mb(),
            **extra,
        }
    )


def _train(
    cfg: DistillConfig,
    student: LoadedModel,
    position: int,
    teacher: TeacherCache,
    prefix: ShardReader,
    key: dict[str, Any],
) -> TrainState:
    device = _device(cfg)
    _to_device(student.model, device)
    params = make_trainable(student.adapter, cfg.train)
    dtype = next(student.model.parameters()).dtype
    data = Batches(teacher, prefix, device, dtype)
    train_idx, val_idx = _split(len(teacher), cfg.val_fraction)
    trainer = Trainer(cfg, student, position, data, params, train_idx, val_idx, key)
    return trainer.run()


def run_distill(cfg: DistillConfig) -> DistillResult:
    """Run the whole ``distill`` stage; writes ``cfg.out`` (with ``distill.json``) when set."""
    clock = _Clock()
    with clock.phase("total"):
        student, position, windows, tkey = _prepare(cfg)
        dtype = next(student.model.parameters()).dtype
        with clock.phase("caches"):
            caches = build_caches(cfg, student, windows, tkey, position)
        teacher, prefix = caches.teacher, caches.prefix
        with clock.phase("train"):
            state = _train(cfg, student, position, teacher, prefix, _run_key(cfg, tkey, position))
        export_patches(student.adapter, dtype)
        extra: dict[str, Any] = {"caches_built": caches.built, "patch_position": position}
        if cfg.perplexity is not None:
            with clock.phase("perplexity"):
                ppl_windows = cfg.perplexity.windows(student.tokenizer)
                extra["perplexity"] = model_perplexity(
                    student.model, ppl_windows, 1, cfg.progress, "ppl distilled"
                )
        _to_device(student.model, torch.device("cpu"))
    summary = _summary(cfg, state, teacher, prefix, clock, extra)
    student.meta = _meta(student.meta, cfg, summary)
    if cfg.out is not None:
        save_patched(student, cfg.out, extra={SUMMARY: summary}, overwrite=cfg.overwrite)
    shutil.rmtree(state_dir(cfg), ignore_errors=True)
    return DistillResult(student, summary, cfg.out)


def _meta(meta: dict[str, Any], cfg: DistillConfig, summary: dict[str, Any]) -> dict[str, Any]:
    new = {k: v for k, v in copy.deepcopy(meta).items() if k != "patches"}
    new["patch"] = {**(new.get("patch") or {}), "trained": cfg.train}
    keep = ("train", "samples_x_seqlen", "steps", "epochs_run", "train_loss", "val_loss")
    new["distill"] = {
        "settings": summary["config"],
        **{k: summary[k] for k in (*keep, "best_epoch", "stopped_early")},
        "teacher": {k: v for k, v in summary["teacher_cache"].items() if k != "dir"},
    }
    return new


__all__ = ["DistillConfig", "DistillResult", "run_distill"]
