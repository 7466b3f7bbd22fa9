"""Where a study stands, per stage, from the manifests and job records its stages write.

    report = study_status(load_study("study.yaml"))   # [{"stage", "state", "done", …}]

No daemon and no database: the slides done come from each stage's manifests (the array
tasks' parts included, read while they run), the jobs from ``jobs/jobs.json`` and SLURM.
A stage's state is one of ``not started``, ``pending``, ``running``, ``partly done``,
``done``, ``failed`` or ``cancelled`` (a stage after one that failed); a running stage
has a rough ETA from the pace of its work so far.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

from gigamil.study import Study

__all__ = ["study_status", "format_eta"]

_DONE = ("ok", "skipped")


def study_status(study: Study) -> list[dict[str, Any]]:
    """Per stage: its state, what is done of what, the failures with their messages, its
    last submission's jobs (state, message, log) and, while it runs, an ETA in seconds."""
    from gigamil.layout import ExtractDir, PredictionsDir, RunDir
    from gigamil.wsi.discovery import find_slides

    data = ExtractDir(study.data)
    report = []
    n_slides = len(find_slides(study.slides, study.extract.recursive).slides)
    extract = _rows([p for p in [data.manifest(), *data.shard_manifests()] if p.exists()])
    report.append(_stage("extract", extract, n_slides, study.data))
    feats = data.features(study.embed.encoder)
    embed = _rows(sorted(feats.root.glob("embed*.csv"))) if feats.root.is_dir() else []
    stores = len(list(data.patches.glob("*.lmdb"))) if data.patches.is_dir() else 0
    report.append(_stage("embed", embed, stores or n_slides, study.data))
    run = RunDir(study.run_dir)
    folds = sorted(run.root.glob("checkpoints/fold*/result.json"))
    summary = json.loads(run.summary.read_text()) if run.summary.exists() else None
    train = _stage("train", [], study.train.folds if study.labels else 0, run.root,
                   done=len(folds), complete=bool(summary and summary.get("complete")),
                   finished=[p.stat().st_mtime for p in folds])
    report.append(train)
    if study.predict:
        preds = PredictionsDir(study.preds)
        ok = _rows([preds.predictions]) if preds.predictions.exists() else []
        bad = _rows([preds.failures]) if preds.failures.exists() else []
        rows = [{**r, "status": "ok"} for r in ok] + [{**r, "status": "failed"} for r in bad]
        n_predict = len(find_slides(study.predict).slides)
        report.append(_stage("infer", rows, n_predict, study.preds))
    for before, this in zip(report, report[1:]):
        if before["state"] in ("failed", "cancelled") and this["state"] in (
                "not started", "failed", "cancelled", "partly done") and not any(
                j["state"] == "done" for j in this["jobs"]) and this["jobs"]:
            this["state"] = "cancelled"
            this["notes"].insert(0, f"not run: {before['stage']} failed")
    return report


def _rows(paths: list[Path]) -> list[dict[str, str]]:
    """Each slide's row, the newest file's where several name it (an array's parts, the
    merged manifest of an earlier run)."""
    by_slide: dict[str, dict[str, str]] = {}
    for p in sorted(paths, key=lambda q: q.stat().st_mtime):
        with open(p, newline="") as fh:
            for i, row in enumerate(csv.DictReader(fh)):
                by_slide[row.get("slide_id") or f"{p.name}:{i}"] = row
    return list(by_slide.values())


def _stage(name: str, rows: list[dict[str, str]], total: int, root: Path,
           done: int | None = None, complete: bool | None = None,
           finished: list[float] | None = None) -> dict[str, Any]:
    failed = [r for r in rows if r.get("status") == "failed"]
    n_done = done if done is not None else sum(r.get("status") in _DONE for r in rows)
    if complete is None:
        complete = total > 0 and n_done >= total and not failed
    state = ("done" if complete else "failed" if failed else
             "partly done" if n_done else "not started")
    jobs = _jobs(root, name)
    notes = [f"{r.get('slide_id', '')}: {r.get('error', '')}" for r in failed]
    eta = None
    active = [j for j in jobs if j["active"]]
    if active and not complete:
        running = [j for j in active if j["state"] in ("running", "requeued")]
        state = "running" if running else "pending"
        reasons = sorted({j["message"] for j in active if j["message"]})
        notes += [f"{len(active)} job(s) {state}" + (f" ({', '.join(reasons)})" if reasons
                                                     else "")]
        eta = _eta(running, rows, total, n_done, finished)
    elif jobs and not complete:
        broken = [j for j in jobs if j["state"] not in ("done",) and not j["active"]]
        if any("DependencyNeverSatisfied" in j["reason"] or j["slurm_state"] == "CANCELLED"
               for j in broken) and not failed:
            state = "cancelled"
        elif broken and not failed:
            state = "failed"
        notes += [f"job {j['job_id']} {j['state']}: {j['message']} (log: {j['log']})"
                  for j in broken if j["message"] and "Dependency" not in j["reason"]]
    return {"stage": name, "state": state, "done": n_done, "total": total,
            "failures": [{"slide_id": r.get("slide_id", ""), "error": r.get("error", "")}
                         for r in failed], "jobs": jobs, "eta_s": eta, "notes": notes}


def _jobs(root: Path, kind: str) -> list[dict[str, Any]]:
    """The stage's last submission of SLURM jobs, if it was submitted."""
    from gigamil.layout import JOBS

    if not (root / JOBS / "jobs.json").exists():
        return []
    from gigamil.cluster.slurm import job_report

    return [{"job_id": j.job_id, "state": j.state, "message": j.message, "log": j.log,
             "active": j.active, "slurm_state": j.slurm_state, "reason": j.reason,
             "started": j.started} for j in job_report(root, latest=True, kind=kind)]


def _eta(running: list[dict[str, Any]], rows: list[dict[str, str]], total: int, n_done: int,
         finished: list[float] | None) -> float | None:
    """Seconds left at the pace since the first running job started: the work it did
    (slides newly ``ok``, or folds finished since) over the time it took."""
    starts = []
    for j in running:
        try:
            starts.append(dt.datetime.fromisoformat(j["started"]).timestamp())
        except ValueError:
            continue
    if not starts:
        return None
    start = min(starts)
    elapsed = dt.datetime.now().timestamp() - start
    new = (sum(t >= start for t in finished) if finished is not None else
           sum(r.get("status") == "ok" for r in rows))
    if new <= 0 or elapsed <= 0:
        return None
    return elapsed / new * max(0, total - n_done)


def format_eta(seconds: float | None) -> str:
    """``~3 min``, ``~2.5 h``, or ``?``."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 5400:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"
