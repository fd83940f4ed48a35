"""Knowledge distillation: train a student to reproduce its teacher.

Losses:

* ``task="classification"``: ``alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, y)``
  (Hinton et al.; T² keeps the soft term's gradients on the scale of the hard one). Batches
  without labels use the soft term alone.
* ``task="embedding"``: ``1 − cos(s, t)`` (``loss="cosine"``) or ``MSE(s, t)`` (``loss="mse"``).
* ``features``: optional {student module: teacher module} pairs whose outputs are matched by
  MSE, weighted by ``feature_weight`` (the shapes must agree; put a projection in the student
  otherwise).

The teacher runs on every batch unless the batches carry its outputs already
(:func:`graphopt.torch.teacher_cache.cache_teacher`: computed once, reused every epoch).

Each epoch ends with a validation pass (accuracy against labels, or agreement with the teacher
when there are none; mean cosine to the teacher for embeddings); the best epoch's weights are
restored at the end and training stops after ``patience`` epochs without improvement.

Distributed: when ``torch.distributed`` is initialized (``torchrun``), the student is wrapped in
``DistributedDataParallel``, a Dataset is sharded with a ``DistributedSampler``, validation
metrics are averaged over ranks (so every rank takes the same early-stopping decision) and only
rank 0 shows progress. The same code runs unchanged in a single process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import UsageError
from graphopt.torch.batches import FeatureTap, first_tensor, split_batch
from graphopt.torch.teacher_cache import TeacherTargets

logger = logging.getLogger(__name__)

TASKS = ("classification", "embedding")
EMBEDDING_LOSSES = ("cosine", "mse")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillOptions:
    task: str = "classification"
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the teacher's soft targets; 1 − alpha goes to the labels
    loss: str = "cosine"  # embedding task: cosine | mse
    features: Mapping[str, str] = dataclasses.field(default_factory=dict)
    feature_weight: float = 1.0
    epochs: int = 10
    batch_size: int = 64  # when ``train`` is a Dataset
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    cosine_schedule: bool = True  # decay the learning rate to 0 along a cosine over all steps
    grad_clip: float | None = 1.0
    patience: int | None = 3
    max_seconds: float | None = None  # stop at the step (distributed: the epoch) crossing this budget
    seed: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.loss not in EMBEDDING_LOSSES:
            raise UsageError(f"loss must be one of {EMBEDDING_LOSSES}, got {self.loss!r}")
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UsageError("temperature and lr must be > 0, epochs and batch_size >= 1")


@dataclasses.dataclass
class DistillResult:
    student: nn.Module
    history: list[dict[str, float]]
    best_epoch: int | None
    best_metric: float | None
    metric: str
    stopped: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_epoch": self.best_epoch, "best_metric": self.best_metric,
                "metric": self.metric, "stopped": self.stopped, "seconds": round(self.seconds, 3)}


# -- losses -------------------------------------------------------------------------------------


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def output_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                options: DistillOptions) -> torch.Tensor:
    if options.task == "embedding":
        s, t = student.flatten(1), teacher.flatten(1)
        if options.loss == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=1)).mean()
        return F.mse_loss(s, t)
    soft = soft_target_loss(student, teacher, options.temperature)
    if labels is None or options.alpha == 1:
        return soft
    return options.alpha * soft + (1 - options.alpha) * F.cross_entropy(student, labels)


@torch.no_grad()
def _teacher_side(teacher: nn.Module, batch: Any, tap: FeatureTap | None) -> tuple[
        tuple[Any, ...], dict[str, Any], torch.Tensor | None, torch.Tensor, Callable[[str], torch.Tensor]]:
    """(inputs, keyword inputs, labels, teacher output, teacher feature by name) of a batch: from
    the cache when it is a :class:`~graphopt.torch.teacher_cache.TeacherTargets`, else by running the teacher."""
    if isinstance(batch, TeacherTargets):
        args, kwargs, labels = split_batch(batch.batch)
        return args, kwargs, labels, batch.output, batch.feature
    args, kwargs, labels = split_batch(batch)
    output = first_tensor(teacher(*args, **kwargs))
    values = dict(tap.values) if tap is not None else {}
    return args, kwargs, labels, output, values.__getitem__


# -- distributed --------------------------------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _mean_over_ranks(values: list[float]) -> list[float]:
    if not _distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return (tensor / torch.distributed.get_world_size()).tolist()


def _loader(data: Any, options: DistillOptions, *, shuffle: bool) -> tuple[Iterable[Any], Any]:
    """A DataLoader over a Dataset (sharded when distributed), or the iterable as given."""
    if not isinstance(data, torch.utils.data.Dataset) or isinstance(data, torch.utils.data.IterableDataset):
        return data, None
    generator = torch.Generator().manual_seed(options.seed)
    sampler = None
    if _distributed():
        sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=shuffle, seed=options.seed)
        shuffle = False
    loader = torch.utils.data.DataLoader(data, batch_size=options.batch_size, shuffle=shuffle,
                                         sampler=sampler, generator=generator)
    return loader, sampler


# -- training -----------------------------------------------------------------------------------


def _progress(total: int | None, options: DistillOptions, description: str) -> Any:
    from graphopt.progress import Progress

    return Progress(description, total, unit="batch", enabled=not options.quiet and _rank() == 0)


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def validation_metrics(teacher: nn.Module, student: nn.Module, data: Any, options: DistillOptions) -> dict[str, float]:
    """Validation metrics on a Dataset or an iterable of batches: ``loss``, and ``accuracy`` (labels), ``agreement`` (teacher's
    argmax) for classification or ``cosine`` (to the teacher) for embeddings."""
    data, _ = _loader(data, options, shuffle=False)
    was_training = student.training
    student.eval()
    totals = {"loss": 0.0, "hits": 0.0, "labelled": 0.0, "agree": 0.0, "cosine": 0.0, "rows": 0.0}
    for batch in data:
        args, kwargs, labels, t, _ = _teacher_side(teacher, batch, None)
        s = first_tensor(student(*args, **kwargs))
        rows = s.shape[0]
        totals["rows"] += rows
        totals["loss"] += float(output_loss(s, t, labels, options)) * rows
        if options.task == "classification":
            totals["agree"] += float((s.argmax(-1) == t.argmax(-1)).sum())
            if labels is not None:
                totals["hits"] += float((s.argmax(-1) == labels).sum())
                totals["labelled"] += rows
        else:
            totals["cosine"] += float(F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1).sum())
    student.train(was_training)
    keys = list(totals)
    totals = dict(zip(keys, _mean_over_ranks([totals[k] for k in keys])))
    if not totals["rows"]:
        raise UsageError("the validation data is empty")
    metrics = {"loss": totals["loss"] / totals["rows"]}
    if options.task == "embedding":
        metrics["cosine"] = totals["cosine"] / totals["rows"]
    else:
        metrics["agreement"] = totals["agree"] / totals["rows"]
        if totals["labelled"]:
            metrics["accuracy"] = totals["hits"] / totals["labelled"]
    return metrics


def _headline(metrics: dict[str, float]) -> str:
    return next(k for k in ("accuracy", "cosine", "agreement") if k in metrics)


def _schedule(step: int, total: int, options: DistillOptions, started: float) -> float:
    """Linear warmup, then a cosine decay to 0 over the steps, or over ``max_seconds`` when
    that budget runs out first (then the schedule, unlike the rest, depends on the machine)."""
    if options.warmup_steps and step < options.warmup_steps:
        return (step + 1) / options.warmup_steps
    if not options.cosine_schedule:
        return 1.0
    progress = (step - options.warmup_steps) / max(1, total - options.warmup_steps) if total else 0.0
    if options.max_seconds:
        progress = max(progress, (time.perf_counter() - started) / options.max_seconds)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _over_budget(started: float, options: DistillOptions) -> bool:
    return options.max_seconds is not None and time.perf_counter() - started > options.max_seconds


def distill(
    teacher: nn.Module,
    student: nn.Module,
    train: Any,
    *,
    val: Any = None,
    options: DistillOptions = DistillOptions(),
) -> DistillResult:
    """Train ``student`` (in place) to match ``teacher`` on ``train``; return the result.

    ``train`` and ``val`` are Datasets (batched here with ``options.batch_size``, shuffled
    with the seed, sharded under ``torchrun``) or any re-iterable of batches (a DataLoader;
    then sharding is the caller's). Batches: see :func:`split_batch`.
    """
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    teacher.eval()  # it runs under no_grad; its parameters keep requires_grad, so copies of it stay trainable
    train_loader, sampler = _loader(train, options, shuffle=True)
    val_loader, _ = _loader(val, options, shuffle=False) if val is not None else (None, None)
    model: nn.Module = student
    if _distributed():
        model = nn.parallel.DistributedDataParallel(student)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=options.lr,
                                  weight_decay=options.weight_decay)
    steps_per_epoch = _length(train_loader)
    total_steps = steps_per_epoch * options.epochs if steps_per_epoch else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, total_steps, options, started))
    student_tap = FeatureTap(student, options.features.keys())
    teacher_tap = FeatureTap(teacher, options.features.values())

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    stopped = "epochs"
    try:
        for epoch in range(options.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            model.train()
            loss_sum, batches = 0.0, 0
            with _progress(steps_per_epoch, options, f"distill {epoch + 1}/{options.epochs}") as bar:
                for batch in train_loader:
                    args, kwargs, labels, t, teacher_features = _teacher_side(teacher, batch, teacher_tap)
                    s = first_tensor(model(*args, **kwargs))
                    loss = output_loss(s, t, labels, options)
                    for s_name, t_name in options.features.items():
                        loss = loss + options.feature_weight * F.mse_loss(student_tap.values[s_name], teacher_features(t_name))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if options.grad_clip:
                        nn.utils.clip_grad_norm_(student.parameters(), options.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    loss_sum, batches = loss_sum + float(loss.detach()), batches + 1
                    bar.update(1, loss=f"{loss_sum / batches:.4f}")
                    if not _distributed() and _over_budget(started, options):
                        break
            if not batches:
                raise UsageError("the training data is empty")
            record = {"epoch": epoch + 1, "train_loss": _mean_over_ranks([loss_sum / batches])[0],
                      "seconds": round(time.perf_counter() - started, 3)}
            if val_loader is not None:
                metrics = validation_metrics(teacher, student, val_loader, options)
                record.update({f"val_{k}": v for k, v in metrics.items()})
                value = metrics[_headline(metrics)]
                if best is None or value > best[0]:
                    best = (value, epoch + 1, copy.deepcopy(student.state_dict()))
            history.append(record)
            logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
            if best is not None and options.patience is not None and epoch + 1 - best[1] >= options.patience:
                stopped = f"early stop: no better {_headline(metrics)} for {options.patience} epochs"
                break
            # Every rank must agree to stop, or the others would wait forever in the next all-reduce.
            if _mean_over_ranks([float(_over_budget(started, options))])[0] > 0:
                stopped = f"time budget {options.max_seconds:.0f} s"
                break
    finally:
        student_tap.close()
        teacher_tap.close()
    if best is not None:
        student.load_state_dict(best[2])
    metric = _headline({k.removeprefix("val_"): v for k, v in history[-1].items() if k.startswith("val_")}) if best else "train_loss"
    return DistillResult(student, history, best[1] if best else None, best[0] if best else None, metric, stopped,
                         time.perf_counter() - started)
