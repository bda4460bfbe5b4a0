"""The ``distillery`` command line: run a pipeline manifest, inspect runs and artifacts."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import Artifact
from pipeline.config import load_manifest
from pipeline.errors import DistilleryError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distillery: curate, distill and validate image datasets on Dask.")
console = Console()
err = Console(stderr=True)


def _fail(msg: str, code: int = 2) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)  # escaped: ``stages[shard]`` is not markup
    raise typer.Exit(code)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log every event")) -> None:
    if not verbose:  # before distributed is imported, so spawned workers inherit it too
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


@app.command()
def run(
    manifest: Path = typer.Argument(..., help="pipeline manifest (YAML)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. stages.shard.samples_per_shard=500"),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="cluster profile from dask_config.yaml"),
    until: Optional[List[str]] = typer.Option(None, "--until", help="run this stage and what it needs, then stop "
                                              "(repeat it to name several)"),
    force: Optional[List[str]] = typer.Option(None, "--force", help="re-run this stage (and everything downstream)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Run (or resume) a pipeline: cached stages are skipped, interrupted ones finish their remaining shards."""
    from pipeline.runner import Runner

    try:
        m = load_manifest(manifest, overrides or [])
        with Runner(m, where=str(manifest), overrides=overrides or [], profile=cluster,
                    show_progress=progress) as runner:
            results = runner.run(until=until or None, force=force or [])
    except DistilleryError as e:
        _fail(str(e))
        return
    table = Table(title=f"{m.name} -> {m.output_dir}")
    for col in ("stage", "status", "artifact", "in", "out", "rejected", "runs", "seconds"):
        table.add_column(col)
    for r in results:
        c = r.counts
        table.add_row(r.name, r.status, r.path.name, *(str(c.get(k, "")) for k in ("in", "out", "rejected", "runs")),
                      f"{r.seconds:.1f}")
    console.print(table)


def _run_steps(name: str, out: Path, steps: list[dict[str, Any]], cluster: str | None, progress: bool):
    """Run an ad-hoc pipeline (stages whose inputs are existing artifacts); exit with a clear error."""
    from pipeline.config import PipelineManifest
    from pipeline.runner import Runner

    try:
        m = PipelineManifest.model_validate({"name": name, "output_dir": str(out), "stages": steps})
        with Runner(m, where=f"<{name}>", profile=cluster, show_progress=progress) as runner:
            return runner.run()
    except (DistilleryError, ValueError) as e:
        _fail(str(e))


def _overrides(epochs: Optional[int], network: Optional[str], extra: Optional[List[str]]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    if epochs:
        out["epochs"] = epochs
    if network:
        out["network"] = network
    for text in extra or []:
        if "=" not in text:
            _fail(f"recipe override '{text}' is not key=value")
        k, v = text.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


@app.command()
def validate(
    artifacts: List[Path] = typer.Argument(..., help="artifacts to validate (shards, selections, distilled sets)"),
    recipe: str = typer.Option("standard-dd", help="training recipe: standard-dd, standard-resnet, fast or a YAML"),
    seeds: Optional[str] = typer.Option(None, help="comma-separated seeds (default: the recipe's evaluation seeds)"),
    ipc: Optional[int] = typer.Option(None, help="train a random subset with this many images per class"),
    fraction: Optional[float] = typer.Option(None, help="train a random class-balanced fraction"),
    epochs: Optional[int] = typer.Option(None),
    network: Optional[str] = typer.Option(None, help="e.g. convnet, resnet18, timm:resnet50"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="recipe override key=value (repeatable)"),
    test: Optional[Path] = typer.Option(None, help="artifact holding the test split (default: each artifact)"),
    out: Path = typer.Option(Path("runs/validate"), help="output directory"),
    cluster: Optional[str] = typer.Option(None, "--cluster"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the recipe on each artifact and report test accuracy (mean ± std over seeds), with the
    random-subset baseline of the same size. Runs the registered ``validate`` stage."""
    params: dict[str, Any] = {"recipe": recipe, **({"seeds": [int(x) for x in seeds.split(",")]} if seeds else {}),
                              "overrides": _overrides(epochs, network, set_)}
    if ipc or fraction:
        params["subset"] = {"ipc": ipc} if ipc else {"fraction": fraction}
    steps = []
    for i, a in enumerate(artifacts):
        inputs = {"train": str(a)} | ({"test": str(test)} if test else {})
        steps.append({"name": f"validate-{i}-{a.resolve().name}", "stage": "validate", "inputs": inputs, "params": params})
    results = _run_steps("validate", out, steps, cluster, progress)
    table = Table(title=f"{recipe} · test top-1 (%) mean ± std over seeds {seeds or '(the recipe’s)'}")
    for col in ("artifact", "n train", "top-1", "random subset, same size", "artifact dir"):
        table.add_column(col)
    for a, r in zip(artifacts, results):
        m = Artifact(r.path).manifest().metrics
        base = m.get("random_baseline")
        table.add_row(str(a), str(m["n_train"]), f"{m['top1_mean']:.2f} ± {m['top1_std']:.2f}",
                      f"{base['top1_mean']:.2f} ± {base['top1_std']:.2f}" if base else "-", str(r.path))
        logging.getLogger("distillery").info("validate %s: %s", a, json.dumps(
            {k: m.get(k) for k in ("top1_mean", "top1_std", "n_train")}))
    console.print(table)


@app.command()
def train(
    artifact: Path = typer.Argument(..., help="a shard artifact (or any training set)"),
    recipe: str = typer.Option("fast"),
    folds: int = typer.Option(1, help=">= 2 trains out-of-fold teachers (predictions for every sample)"),
    seed: int = typer.Option(0),
    epochs: Optional[int] = typer.Option(None),
    network: Optional[str] = typer.Option(None),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="recipe override key=value (repeatable)"),
    out: Path = typer.Option(Path("runs/train")),
    cluster: Optional[str] = typer.Option(None, "--cluster"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train teacher checkpoints (teachers/fold_K.pt) on an artifact."""
    params = {"recipe": recipe, "folds": folds, "seed": seed, "overrides": _overrides(epochs, network, set_)}
    r = _run_steps("train", out, [{"name": "teacher", "inputs": {"data": str(artifact)}, "params": params}],
                   cluster, progress)[0]
    console.print(f"teachers: {r.path / 'teachers'}  metrics: " + json.dumps(Artifact(r.path).manifest().metrics.get("test_top1_mean")))


def stage_state(path: Path) -> tuple[str, str]:
    """done / failed / partial / pending, with committed vs planned tasks (over every planned phase)."""
    art = Artifact(path)
    if art.is_complete():
        return "done", ""
    from pipeline.plans import plan_size

    parts = len(art.committed_parts())
    sizes = [plan_size(p) for p in sorted(path.glob(".plan*.json"))]
    total = "?" if not sizes or None in sizes else str(sum(s for s in sizes if s is not None))
    failed = path / "failed.jsonl"
    if failed.is_file():
        n_failed = len(failed.read_text().splitlines())
        return "failed", f"{parts}/{total} tasks, {n_failed} failed: see {failed}"
    return ("partial" if parts else "pending"), f"{parts}/{total} tasks"


@app.command()
def status(run_dir: Path = typer.Argument(..., help="a pipeline's output_dir")) -> None:
    """Table of a run's stages: done / partial / pending, counts, time."""
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        _fail(f"{run_dir}: no run.json (not a distillery run directory)")
    record = json.loads(record_path.read_text())
    table = Table(title=f"{record['manifest'].get('name', '')}  ({run_dir})")
    for col in ("stage", "state", "artifact", "in", "out", "rejected", "rejects by reason; breakdown", "seconds"):
        table.add_column(col)
    for name in record["order"]:
        info = record["stages"].get(name)
        if info is None:
            table.add_row(name, "pending", "", "", "", "", "", "")
            continue
        path = Path(info["path"])
        state, detail = stage_state(path)
        counts: dict[str, Any] = {}
        secs = ""
        if state == "done":
            m = Artifact(path).manifest()
            counts = m.counts
            secs = f"{sum(v for k, v in m.timings.items() if k in ('plan_s', 'run_s', 'finalize_s')):.1f}"
        # a stage's own breakdown of its output (e.g. relabel's keep/relabel/drop) shown beside the rejects
        reasons = ", ".join(f"{k}: {v}" for k, v in {**counts.get("rejected_by_reason", {}),
                                                     **counts.get("breakdown", {})}.items())
        table.add_row(name, state if not detail else f"{state} ({detail})", path.name, str(counts.get("in", "")),
                      str(counts.get("out", "")), str(counts.get("rejected", "")), reasons, secs)
    console.print(table)


@app.command()
def show(artifact_dir: Path = typer.Argument(..., help="an artifact directory")) -> None:
    """Summary of an artifact's manifest."""
    try:
        m = Artifact(artifact_dir).manifest()
    except FileNotFoundError as e:
        _fail(str(e))
        return
    console.print(f"[bold]{m.name}[/] ({m.kind} artifact of stage {m.stage} v{m.stage_version})  "
                  f"id {m.artifact_id[:16]}  {m.created}")
    console.print(f"code {m.code_version}")
    console.print(f"inputs: {m.inputs or '-'}")
    console.print("params: " + json.dumps(m.params, sort_keys=True))
    console.print("counts: " + json.dumps(m.counts, sort_keys=True))
    readers = m.metrics.get("read_with") if isinstance(m.metrics.get("read_with"), dict) else {}
    if m.metrics:
        console.print("metrics: " + json.dumps({k: v for k, v in m.metrics.items() if k != "read_with"}, sort_keys=True))
    for split, r in readers.items():  # how to read this artifact with plain tools, exactly
        import re

        where = artifact_dir.resolve() / r["pattern"]
        console.print(f"read {split} ({r.get('samples', '?')} samples): {where}", markup=False)
        if r.get("python"):  # the stored line names the path at creation; point it at where the artifact is now
            line = re.sub(r'WebDataset\("[^"]*"', lambda _: f'WebDataset("{where}"', r["python"], count=1)
            console.print(f"  {line}", markup=False, soft_wrap=True)
    console.print("timings: " + ", ".join(f"{k}={v}s" for k, v in m.timings.items()))
    n_files = sum(len(p.files) for p in m.parts) + len(m.files)
    n_bytes = sum(f.bytes for p in m.parts for f in p.files) + sum(f.bytes for f in m.files)
    console.print(f"{len(m.parts)} parts, {n_files} files, {n_bytes / 1e6:.1f} MB")


@app.command()
def stages() -> None:
    """List the registered stages (with the artifact kinds they read and write) and every plug-in family."""
    from importlib.metadata import entry_points

    from pipeline.stage import STAGES

    table = Table(title="stages")
    for col in ("stage", "inputs (kinds)", "output kind", "resources"):
        table.add_column(col)
    for name in STAGES.names():
        cls = STAGES.get(name)
        ins = ", ".join(f"{k}: {'|'.join(v) or 'any'}" for k, v in cls.input_kinds.items())
        table.add_row(name, ins or "-", cls.output_kind, json.dumps(cls.resources) if cls.resources else "-")
    console.print(table)
    for ep in sorted(entry_points(group="distillery.families"), key=lambda e: e.name):
        console.print(f"{ep.name}: " + ", ".join(ep.load().names()))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a pipeline's output_dir"),
           out: Optional[Path] = typer.Option(None, help="where to write (default RUN_DIR/report.html)")) -> None:
    """One self-contained HTML page for a run: counts, timings, pictures and the comparison table."""
    from pipeline.report import write_report

    try:
        path = write_report(run_dir, out)
    except FileNotFoundError as e:
        _fail(str(e))
        return
    console.print(f"wrote {path}")


@app.command()
def schema(out: Optional[Path] = typer.Option(None, help="write here instead of stdout")) -> None:
    """The JSON schema of artifact manifests."""
    from pipeline.artifacts import manifest_json_schema
    from pipeline.atomic import dumps_json, write_text

    text = dumps_json(manifest_json_schema())
    if out:
        write_text(out, text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    app()
