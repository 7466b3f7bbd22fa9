"""Where a study stands, per stage, from the manifests and job records its stages write.

    report = study_status(load_study("study.yaml"))   # [{"stage", "state", "done", …}]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gigamil.study import Study

__all__ = ["study_status"]


def study_status(study: Study) -> list[dict[str, Any]]:
    """Per stage: its state (``not started``, ``running``, ``done``, ``failed``, ``partly
    done``), what is done of what, the failures with their messages, and its jobs' states,
    from the manifests and job records the stages write."""
    import csv

    from gigamil.layout import ExtractDir, PredictionsDir, RunDir

    def rows(paths: list[Path]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for p in paths:
            with open(p, newline="") as fh:
                out.extend(csv.DictReader(fh))
        return out

    report = []
    data = ExtractDir(study.data)
    extract = rows([p for p in [data.manifest(), *data.shard_manifests()] if p.exists()])
    report.append(_stage("extract", extract, study.data))
    feats = data.features(study.embed.encoder)
    embed = rows(sorted(feats.root.glob("embed*.csv"))) if feats.root.is_dir() else []
    report.append(_stage("embed", embed, feats.root))
    run = RunDir(study.run_dir)
    folds = sorted(run.root.glob("checkpoints/fold*/result.json"))
    summary = json.loads(run.summary.read_text()) if run.summary.exists() else None
    n_folds = study.train.folds if study.labels else 0
    state = ("done" if summary and summary.get("complete") else
             "partly done" if folds else "not started")
    report.append({"stage": "train", "state": state, "done": len(folds), "total": n_folds,
                   "failures": [], **_jobs(run.root)})
    if study.predict:
        preds = PredictionsDir(study.preds)
        ok = rows([preds.predictions]) if preds.predictions.exists() else []
        bad = rows([preds.failures]) if preds.failures.exists() else []
        done = [{"status": "ok"} for _ in ok] + [{"status": "failed", **r} for r in bad]
        report.append(_stage("infer", done, study.preds))
    return report


def _stage(name: str, rows: list[dict[str, str]], root: Path) -> dict[str, Any]:
    failed = [r for r in rows if r.get("status") == "failed"]
    done = [r for r in rows if r.get("status") in ("ok", "skipped")]
    state = "not started" if not rows else "failed" if failed else "done"
    return {"stage": name, "state": state, "done": len(done), "total": len(rows),
            "failures": [{"slide_id": r.get("slide_id", ""), "error": r.get("error", "")}
                         for r in failed], **_jobs(root)}


def _jobs(root: Path) -> dict[str, Any]:
    """The stage's SLURM jobs, if it was submitted: their states and log paths."""
    from gigamil.layout import JOBS

    if not (root / JOBS / "jobs.json").exists():
        return {"jobs": []}
    from gigamil.cluster.slurm import job_report

    return {"jobs": [{"job_id": j.job_id, "state": j.state, "message": j.message,
                      "log": j.log} for j in job_report(root)]}
