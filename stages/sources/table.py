"""A parquet or CSV table with a path column (+ optional caption, label, split and extra metadata columns)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from stages.sources.base import (
    SOURCES, FileReader, Mapper, Reader, SampleRef, Source, SourceError, SourceParams, ext_of, stat_fingerprint,
)


class TableParams(SourceParams):
    kind: Literal["table"] = "table"
    path: Path
    path_column: str = "path"
    caption_column: str | None = "caption"  # used when present
    label_column: str | None = "label"
    split_column: str | None = "split"
    root: Path | None = None  # base of relative paths; default: the table's folder
    extra_columns: list[str] | None = None  # default: every other column


def read_table(path: Path) -> list[dict[str, Any]]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        elif path.suffix.lower() in (".csv", ".tsv"):
            opts = pcsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            table = pcsv.read_csv(path, parse_options=opts)
        else:
            raise SourceError(f"{path}: table source must be .parquet, .csv or .tsv")
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad source
        raise SourceError(f"{path}: cannot read table: {e}") from None
    return table.to_pylist()


@SOURCES.register("table")
class TableSource(Source):
    kind = "table"
    Params = TableParams
    params: TableParams

    def check(self) -> None:
        if not self.params.path.is_file():
            raise SourceError(f"{self.params.path}: source table does not exist")

    def fingerprint(self) -> str:
        return stat_fingerprint([self.params.path])

    def scan(self, map: Mapper) -> list[SampleRef]:
        p = self.params
        rows = read_table(p.path)
        if not rows:
            raise SourceError(f"{p.path}: source table has no rows")
        cols = list(rows[0])
        if p.path_column not in cols:
            raise SourceError(f"{p.path}: no path column '{p.path_column}' (columns: {', '.join(cols)})")
        cap = p.caption_column if p.caption_column in cols else None
        lab = p.label_column if p.label_column in cols else None
        spl = p.split_column if p.split_column in cols else None
        used = {p.path_column, cap, lab, spl}
        extra_cols = p.extra_columns if p.extra_columns is not None else [c for c in cols if c not in used]
        root = p.root or p.path.parent
        refs = []
        for i, row in enumerate(rows):
            raw = row[p.path_column]
            if raw is None or str(raw) == "":
                raw = ""
            f = Path(str(raw))
            f = f if f.is_absolute() else root / f
            extra = {c: _jsonable(row.get(c)) for c in extra_cols} or None
            label = row.get(lab) if lab else None
            refs.append(SampleRef(
                ident=f"{i:09d}:{raw}", ext=ext_of(str(raw)) or "jpg", locator=(str(f),),
                split=str(row[spl]) if spl and row.get(spl) is not None else "train",
                label=label if label is None or isinstance(label, (int, str)) else str(label),
                caption=None if not cap or row.get(cap) is None else str(row[cap]),
                size=f.stat().st_size if f.is_file() else -1, extra=extra,
            ))
        return refs

    def open_reader(self) -> Reader:
        return FileReader()


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)
