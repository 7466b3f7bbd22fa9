"""`gigamil train` and `gigamil eval`: feature bags + labels → cross-validated MIL models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

import gigamil.cli.options as opt
from gigamil.cli._common import cli_errors, err, out, progress_bar
from gigamil.cli.cluster import run_stage_here_or_submit
from gigamil.cluster.executor import ClusterOptions
from gigamil.cluster.stages import TrainStage
from gigamil.errors import UsageError
from gigamil.mil.train_config import (
    CV,
    Calibrate,
    ClassWeights,
    Loss,
    Monitor,
    Precision,
    RegressionLoss,
    Standardize,
    SurvivalLoss,
    Task,
    TrainConfig,
)

#: The defaults of every training option: read from the config, never restated here.
T = TrainConfig
Resume = Literal["auto", "never"]


#: the metrics a table shows, in order, where the report has them
TABLE_METRICS = ("auroc", "bal_acc", "acc", "f1_macro", "kappa", "ece", "c_index", "r2", "mae",
                 "pearson")


def _metrics_table(title: str, report: dict[str, Any]) -> Table:
    rows = [(k, v) for k, v in report.get("folds", {}).items() if "metrics" in v or "test" in v]
    if "pooled" in report:
        rows.append(("pooled", report["pooled"]))
    present = rows[-1][1].get("test", rows[-1][1])["metrics"] if rows else {}


    def rank(k: str) -> int:  # each target's first metrics before any target's later ones
        return next((i for i, m in enumerate(TABLE_METRICS) if k == m or k.endswith("_" + m)),
                    -1)

    names = sorted((k for k in present if rank(k) >= 0), key=rank)[:6]
    table = Table("fold", "n", *names, title=title, title_justify="left")
    for name, entry in rows:
        entry = entry.get("test", entry)
        m = entry["metrics"]
        table.add_row(name, str(entry["n"]), *(
            f"{m[k]['value']:.2f} ({m[k]['ci95'][0]:.2f}–{m[k]['ci95'][1]:.2f})" if k in m
            else "" for k in names))
    return table


def _floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--target-weights {text!r} is not a list of numbers",
                         "e.g. --target-weights 1,0.5") from None


@cli_errors
@opt.cluster_options("train")
def train(
    features: Annotated[Path, typer.Option(help="Feature folder from `gigamil embed`, e.g. "
                                           "data/features/resnet50.")],
    labels: Annotated[Path, typer.Option(help="CSV: slide_id,label[,patient_id,site,split].")],
    run_out: Annotated[Path, typer.Option("--out", help="Run directory (config, checkpoints, "
                                          "metrics, predictions).")],
    model: Annotated[str, typer.Option(help="A registered model (see `gigamil models`).")] = T.model,
    model_option: Annotated[list[str] | None, typer.Option(
        "--model-option", "-o", help="Model option KEY=VALUE, repeatable (e.g. -o hidden=128).")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds (by patient).")] = T.folds,
    cv: Annotated[CV, typer.Option(help="patient: stratified k-fold by patient; site: hold "
                                   "out each site of the site column.")] = T.cv,
    val_frac: Annotated[float, typer.Option(min=0.0, max=0.5, help="Share of the training "
                                            "patients used for validation (0 = none).")] = T.val_frac,
    epochs: Annotated[int, typer.Option(min=1)] = T.epochs,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak AdamW learning rate.")] = T.lr,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = T.weight_decay,
    warmup_epochs: Annotated[float, typer.Option(min=0.0, help="Linear warm-up, then cosine.")] = T.warmup_epochs,
    batch_size: Annotated[int, typer.Option(min=1, help="Bags per step, over all GPUs "
                                            "(padded to the longest, with a mask).")] = T.batch_size,
    accumulate: Annotated[int, typer.Option(min=1, help="Gradient accumulation steps.")] = T.accumulate,
    max_instances: Annotated[int, typer.Option(min=0, help="Randomly subsample longer bags "
                                               "to this many patches when training (0 = off).")] = T.max_instances or 0,
    bucket: Annotated[bool, typer.Option(help="Batch bags of similar length together.")] = T.bucket,
    clip_grad: Annotated[float, typer.Option(min=0.0, help="Gradient norm clip (0 = off).")] = T.clip_grad or 0.0,
    precision: Annotated[Precision, typer.Option(help="fp32, bf16 (autocast) or fp16 (with a "
                                                 "gradient scaler).")] = T.precision,
    class_weights: Annotated[ClassWeights, typer.Option(
        help="auto: inverse-frequency loss weights (unless --balanced-sampler).")] = T.class_weights,
    balanced_sampler: Annotated[bool, typer.Option(help="Draw bags with equal probability "
                                                   "per class.")] = T.balanced_sampler,
    loss: Annotated[Loss, typer.Option(help="ce, or evidential (Dirichlet head with "
                                       "uncertainty).")] = T.loss,
    early_stop: Annotated[int, typer.Option(min=0, help="Stop after this many epochs without "
                                            "validation improvement (0 = off).")] = T.early_stop or 0,
    monitor: Annotated[Monitor, typer.Option(help="Validation metric for early stopping and "
                                             "the best checkpoint.")] = T.monitor,
    resume: Annotated[Resume, typer.Option(help="auto: continue each fold from its latest "
                                           "valid checkpoint and skip finished folds.")] = "never",
    seed: Annotated[int, typer.Option()] = T.seed,
    fold: Annotated[list[int] | None, typer.Option(help="Train only this fold (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto (this rank's GPU, else CPU), cpu, cuda:N.")] = T.device,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes reading bags.")] = T.workers,
    preload: Annotated[bool, typer.Option(help="Keep all bags in memory (small cohorts).")] = T.preload,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Also checkpoint every N optimizer "
                                                  "steps (0 = end of each epoch only).")] = T.checkpoint_every,
    keep_last: Annotated[int, typer.Option(min=1, help="Numbered checkpoints kept per fold.")] = T.keep_last,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the 95% CIs.")] = T.bootstrap,
    label_column: Annotated[str, typer.Option(help="Column of the labels CSV to predict.")] = T.label_column,
    kind: Annotated[Task, typer.Option(
        "--task", rich_help_panel="Targets", help="What each --target is: classification, survival "
        "(columns time,event, or NAME_time,NAME_event) or regression.")] = T.task,
    target: Annotated[str | None, typer.Option(
        rich_help_panel="Targets", help="Columns to predict, one head each: cms,msi,braf; "
        "COLUMN:KIND mixes kinds (os:survival,tmb:regression). Empty cells are masked. "
        "[default: --label-column; survival: time,event]")] = None,
    target_weights: Annotated[str | None, typer.Option(
        rich_help_panel="Targets", help="Loss weight per --target, e.g. 1,0.5,0.5.")] = None,
    time_column: Annotated[str, typer.Option(rich_help_panel="Targets",
                                             help="Follow-up time column.")] = T.time_column,
    event_column: Annotated[str, typer.Option(
        rich_help_panel="Targets", help="Event column (1 = event, 0 = censored).")] = T.event_column,
    survival_loss: Annotated[SurvivalLoss, typer.Option(
        rich_help_panel="Targets", help="nll: discrete-time hazards over quantile time bins; "
        "cox: partial likelihood over each batch (gathered over every rank).")] = T.survival_loss,
    time_bins: Annotated[int, typer.Option(min=1, rich_help_panel="Targets",
                                           help="Time bins of the nll loss.")] = T.time_bins,
    regression_loss: Annotated[RegressionLoss, typer.Option(
        rich_help_panel="Targets", help="On the standardized target.")] = T.regression_loss,
    standardize: Annotated[Standardize, typer.Option(
        help="Standardize features on each fold's training bags (saved with the model); "
        "auto: when they are far from zero mean and unit scale.")] = T.standardize,
    calibrate: Annotated[Calibrate, typer.Option(
        help="temperature: fit temperature scaling of each classification head on the fold's "
        "inner validation split (when it has at least 20 labelled slides); eval and infer "
        "apply it.")] = T.calibrate,
    config: opt.ConfigFile = None,
    *,
    cluster: ClusterOptions,
) -> None:
    """Train an attention-MIL model with stratified, patient-grouped k-fold cross-validation.

    Writes OUT/config.json, splits.csv, a folder of checkpoints per fold (numbered,
    checksummed, and the fold's best model), metrics.csv (per epoch, and test metrics
    with 95% bootstrap CIs), predictions_fold<k>.csv, reliability.png and summary.json. SIGTERM checkpoints and
    stops, SIGUSR1 checkpoints and goes on; `--resume auto` continues bit-for-bit. Under
    torchrun (or srun) every rank joins one DDP run: gloo on CPU, NCCL on GPU.

    With --executor slurm the run is one job (--nodes × --gpus-per-node ranks) that
    checkpoints and requeues itself on USR2 (time limit or pre-emption) and resumes
    from its checkpoints after any restart.
    """

    cfg = TrainConfig(
        features=str(features), labels=str(labels), out=str(run_out), model=model,
        model_options=opt.parse_key_values(model_option, "model option"), label_column=label_column,
        task=kind, target=tuple(target.split(",")) if target else None,
        target_weights=_floats(target_weights), time_column=time_column,
        event_column=event_column, survival_loss=survival_loss, time_bins=time_bins,
        regression_loss=regression_loss, standardize=standardize, calibrate=calibrate,
        folds=folds, cv=cv, val_frac=val_frac, epochs=epochs, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, batch_size=batch_size,
        accumulate=accumulate, max_instances=max_instances or None, bucket=bucket,
        clip_grad=clip_grad or None, precision=precision,
        class_weights=class_weights, balanced_sampler=balanced_sampler, loss=loss,
        early_stop=early_stop or None, monitor=monitor, seed=seed,
        only_folds=tuple(fold) if fold else None, device=device, workers=workers, preload=preload,
        checkpoint_every=checkpoint_every, keep_last=keep_last, bootstrap=bootstrap)
    with progress_bar() as bar:
        task = bar.add_task("train", total=None, info="")

        def on_epoch(e: dict[str, Any]) -> None:
            val = f" val {monitor} {e['val_' + monitor]:.3f}" if f"val_{monitor}" in e else ""
            bar.update(task, advance=1, info=f"fold {e['fold']} epoch {e['epoch']}/{e['epochs']} "
                       f"loss {e['train_loss']:.3f}{val}")

        stage = TrainStage(cfg, resume=resume == "auto", on_epoch=on_epoch)
        jobs = run_stage_here_or_submit(stage, cluster, bar, task)
    if not jobs:
        return
    summary = jobs[0]
    if "pooled" in summary or summary.get("folds"):
        out.print(_metrics_table(f"{model} — test metrics with 95% CIs", summary))
    err.print(f"[green]run written to[/] {run_out}", highlight=False)


@cli_errors
def evaluate(
    run: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A run directory.")],
    features: Annotated[Path | None, typer.Option(help="Score the fold models on this "
                                                  "feature folder (an external cohort).")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels of that cohort.")] = None,
    eval_out: Annotated[Path | None, typer.Option(
        "--out", help="Where predictions go (default RUN/eval/<features folder name>).")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples.")] = 1000,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Metrics with 95% bootstrap CIs, per fold and pooled.

    Without --features: the run's own out-of-fold test predictions. With --features and
    --labels: every fold's best model predicts that cohort, and their mean is the ensemble.
    """
    from gigamil.mil.evaluate import evaluate_run
    from gigamil.mil.train_config import default_device

    if (features is None) != (labels is None):
        raise UsageError("--features and --labels go together")
    report = evaluate_run(run, features, labels, eval_out, n_boot=bootstrap,
                          device=default_device(device))
    if as_json:
        out.print_json(json.dumps(report))
    else:
        out.print(_metrics_table(f"{run.name} — metrics with 95% CIs", report))
