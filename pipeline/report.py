"""One self-contained HTML page for a run: each stage's counts, timings, metrics and pictures, and the comparison
table of every trained result beside its same-size random control.

The page is built only from what the run wrote (``run.json``, each artifact's ``manifest.json`` and the PNG files
its manifest lists), so it knows nothing of any particular stage; pictures are embedded as data URIs, so the page
can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Iterable

from pipeline.artifacts import Artifact, ArtifactManifest
from pipeline.atomic import write_text

MAX_IMAGE_BYTES = 8 << 20  # larger pictures are linked, not embedded
REPORT_FILE = "report.html"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1d1d1f;
padding:0 1rem}h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2.5rem}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.35rem .6rem;text-align:right}th{background:#f5f5f7}
td.l,th.l{text-align:left}.ok{color:#0a7d28}.bad{color:#b3261e}.kind{font-size:.8rem;color:#555;
background:#eef;border-radius:4px;padding:.1rem .4rem;margin-left:.5rem}figure{display:inline-block;margin:.5rem 1rem
.5rem 0;vertical-align:top}figure img{max-width:560px;border:1px solid #ddd}figcaption{font-size:.8rem;color:#555}
nav a{margin-right:1rem}code{background:#f5f5f7;padding:.1rem .3rem;border-radius:3px}
details{margin:.4rem 0}pre{background:#f8f8f8;padding:.6rem;overflow:auto;font-size:.8rem}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: Iterable[list[str]], left: int = 1) -> str:
    """An HTML table; cells are already-escaped HTML; the first ``left`` columns are left-aligned."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pictures(path: Path, m: ArtifactManifest) -> list[str]:
    files = [f.path for f in m.files] + [f.path for p in m.parts for f in p.files]
    return sorted(dict.fromkeys(f for f in files if f.lower().endswith(".png")))


def _figure(path: Path, rel: str) -> str:
    f = path / rel
    if not f.is_file():
        return f"<p class=bad>missing picture {_e(rel)}</p>"
    if f.stat().st_size > MAX_IMAGE_BYTES:
        return f'<p><a href="{_e(f.resolve().as_uri())}">{_e(rel)}</a> (too large to embed)</p>'
    data = base64.b64encode(f.read_bytes()).decode()
    return (f'<figure><img alt="{_e(rel)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(rel)}</figcaption></figure>")


def _scalars(d: dict[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Flatten a metrics dict to (dotted key, scalar) pairs, skipping long lists and deep nesting."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth < 2:
            out.extend(_scalars(v, f"{key}.", depth + 1))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((key, v))
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float, str)) for x in v):
            out.append((key, ", ".join(_fmt(x) for x in v)))
    return out


def _mean_std(m: dict[str, Any]) -> str:
    return f"{m['top1_mean']:.2f} ± {m.get('top1_std', 0.0):.2f}"


def _results_table(arts: list[tuple[str, Path, ArtifactManifest]]) -> str:
    rows = []
    for name, _, m in arts:
        mt = m.metrics
        if "top1_mean" not in mt:
            continue
        base = mt.get("random_baseline")
        if base and "top1_mean" in base:
            delta = mt["top1_mean"] - base["top1_mean"]
            ctrl = _e(_mean_std(base))
            verdict = f'<span class="{"ok" if delta > 0 else "bad"}">{delta:+.2f}</span>'
        else:
            reason = (mt.get("baseline") or {}).get("reason") if isinstance(mt.get("baseline"), dict) else None
            ctrl, verdict = _e(reason or "-"), "-"
        space = mt.get("model_space", {})
        space_s = space.get("kind", "") if isinstance(space, dict) else str(space)
        rows.append([f'<a href="#{_e(name)}">{_e(name)}</a>', _e(mt.get("n_train", "")), _e(_mean_std(mt)), ctrl,
                     verdict, _e(mt.get("recipe", "")), _e(mt.get("network", "")), _e(mt.get("epochs", "")),
                     _e(space_s), _e(len(mt.get("per_seed", {})) or "")])
    if not rows:
        return ""
    return ("<h2 id=results>Results: test top-1 (%) beside the same-size random real subset</h2>"
            + _table(["stage", "train samples", "top-1", "random subset, same size", "Δ", "recipe", "network",
                      "epochs", "model space", "seeds"], rows))


def _cheap_table(arts: list[tuple[str, Path, ArtifactManifest]]) -> str:
    """Evaluations that train nothing (metrics named ``<method>_top1``, e.g. the probe stage's linear and kNN)."""
    rows, methods = [], []
    for name, _, m in arts:
        found = {k[:-5]: v for k, v in m.metrics.items() if k.endswith("_top1") and isinstance(v, (int, float))}
        if not found or "top1_mean" in m.metrics:
            continue
        methods += [k for k in found if k not in methods]
        rows.append((name, m.metrics.get("n_train", ""), found))
    if not rows:
        return ""
    return ("<h2>Cheap evaluations: test top-1 (%) on frozen embeddings</h2>"
            + _table(["stage", "train samples", *methods],
                     [[f'<a href="#{_e(n)}">{_e(n)}</a>', _e(k), *(_e(_fmt(f.get(x, ""))) for x in methods)]
                      for n, k, f in rows]))


def build_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no run.json (not a distillery run directory)")
    record = json.loads(record_path.read_text())
    name = record.get("manifest", {}).get("name", run_dir.name)
    arts: list[tuple[str, Path, ArtifactManifest]] = []
    summary = []
    for stage in record.get("order", []):
        info = record.get("stages", {}).get(stage)
        if info is None:
            summary.append([_e(stage), "", "pending", "", "", "", "", "", ""])
            continue
        path = Path(info["path"])
        art = Artifact(path)
        if not art.is_complete():
            summary.append([_e(stage), "", _e(info.get("status", "incomplete")), "", "", "", "", "", _e(path.name)])
            continue
        m = art.manifest()
        arts.append((stage, path, m))
        c = m.counts
        secs = sum(v for k, v in m.timings.items() if k in ("plan_s", "run_s", "finalize_s"))
        summary.append([f'<a href="#{_e(stage)}">{_e(stage)}</a>', _e(m.kind), _e(info.get("status", "")),
                        *(_e(c.get(k, "")) for k in ("in", "out", "rejected", "runs")), f"{secs:.1f}",
                        _e(path.name)])
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{_e(name)} · distillery report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(name)}</h1><p class=sub>{_e(record.get('manifest', {}).get('description', ''))}</p>",
             f"<p class=sub>manifest <code>{_e(record.get('manifest_path', ''))}</code> · started "
             f"{_e(record.get('started', ''))} · finished {_e(record.get('finished', 'not yet'))} · code "
             f"<code>{_e(record.get('code_version', ''))}</code></p>",
             "<nav>" + "".join(f'<a href="#{_e(s)}">{_e(s)}</a>' for s, _, _ in arts) + "</nav>",
             "<h2>Stages</h2>", _table(["stage", "kind", "status", "in", "out", "rejected", "runs", "seconds",
                                        "artifact"], summary),
             _results_table(arts), _cheap_table(arts)]
    for stage, path, m in arts:
        parts.append(f'<h2 id="{_e(stage)}">{_e(stage)}<span class=kind>{_e(m.kind)} · {_e(m.stage)} '
                     f"v{_e(m.stage_version)}</span></h2>")
        parts.append(f"<p class=sub><code>{_e(path)}</code> · id {_e(m.artifact_id[:16])} · {_e(m.created)}</p>")
        counts = [(k, v) for k, v in _scalars(m.counts)]
        if counts:
            parts.append(_table(["count", "value"], [[_e(k), _e(_fmt(v))] for k, v in counts]))
        timings = " · ".join(f"{k} {v:.1f}s" for k, v in m.timings.items())
        parts.append(f"<p class=sub>{_e(timings)}</p>")
        metrics = _scalars({k: v for k, v in m.metrics.items() if k not in ("read_with",)})
        if metrics:
            parts.append("<details><summary>metrics</summary>" + _table(
                ["metric", "value"], [[_e(k), _e(_fmt(v))] for k, v in metrics]) + "</details>")
        params = json.dumps(m.params, indent=1, sort_keys=True, default=str)
        parts.append(f"<details><summary>parameters</summary><pre>{_e(params)}</pre></details>")
        parts.extend(_figure(path, rel) for rel in _pictures(path, m))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    out = out or Path(run_dir) / REPORT_FILE
    write_text(out, build_report(Path(run_dir)))
    return out
