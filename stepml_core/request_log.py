"""Request logs: every request a load generator sent, with the latency its client saw (docs/request-logs.md).

A run folder may hold either or both of

* ``requests.json[.gz]`` (+ ``ground_truth.json[.gz]``): the replay format of the 16 real runs —
  a header (experiment, model, workload profile, the run's calibration ``split`` = its *role*,
  serving ``config``, ``model_config``) and ``requests``: one record per request sent
  (``index``, ``arrival_time_us`` from the first request, ``input_tokens``, ``output_tokens``,
  ``prefix_group``, ``has_error``); the ground truth gives per request ``has_error``, ``e2e_s``
  and ``ttft_s`` (client side, seconds) where known;
* ``results/per_request_lifecycle_metrics.json``: inference-perf's per-request records
  (``start_time``, ``end_time``, ``info.input_tokens``/``output_tokens``/``output_token_times``,
  ``error``), which carry both the load and the observed latencies.

``read_request_log`` turns them into one table, one row per request (:class:`RequestLogSchema`):
``index, arrival_time_us, input_tokens, output_tokens, prefix_group, has_error`` and the
observed ``observed_has_error, observed_ttft_s, observed_e2e_s`` (null where the run's ground
truth is absent: such a run can be predicted, not scored). Records that fail the schema go to
the quarantine (file, record index, reason): records in = kept + quarantined.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandera.polars as pa
import polars as pl

REQUESTS_FILES = ("requests.json", "requests.json.gz")
GROUND_TRUTH_FILES = ("ground_truth.json", "ground_truth.json.gz")
LIFECYCLE_FILE = "results/per_request_lifecycle_metrics.json"
MAX_ARRIVAL_US = 7 * 24 * 3600 * 10**6  # a week of traffic
MAX_TOKENS = 1 << 20
MAX_LATENCY_S = 24 * 3600.0
ROLES = ("train", "validate", "test")

REQUEST_LOG_COLUMNS = {
    "index": pl.Int64,
    "arrival_time_us": pl.Int64,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "prefix_group": pl.Utf8,
    "has_error": pl.Boolean,
    "observed_has_error": pl.Boolean,
    "observed_ttft_s": pl.Float64,
    "observed_e2e_s": pl.Float64,
}
QUARANTINE_COLUMNS = {"file": pl.Utf8, "line": pl.Int64, "kind": pl.Utf8, "reason": pl.Utf8, "excerpt": pl.Utf8}


class RequestLogError(ValueError):
    """A request file that cannot be read at all (not JSON, wrong shape); names the file."""


class RequestLogSchema(pa.DataFrameModel):
    """One row per request sent; ``observed_*`` from the client (null where not known)."""

    index: int = pa.Field(ge=0, unique=True, nullable=False)
    arrival_time_us: int = pa.Field(ge=0, le=MAX_ARRIVAL_US, nullable=False)
    input_tokens: int = pa.Field(ge=0, le=MAX_TOKENS, nullable=False)
    output_tokens: int = pa.Field(ge=0, le=MAX_TOKENS, nullable=False)
    prefix_group: str = pa.Field(nullable=True)
    has_error: bool = pa.Field(nullable=False)
    observed_has_error: bool = pa.Field(nullable=True)
    observed_ttft_s: float = pa.Field(ge=0.0, le=MAX_LATENCY_S, nullable=True)
    observed_e2e_s: float = pa.Field(gt=0.0, le=MAX_LATENCY_S, nullable=True)

    class Config:
        strict = True
        coerce = False

    @pa.dataframe_check(error="input_tokens >= 1 unless the request errored")
    def prompt_unless_error(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select((pl.col("input_tokens") >= 1) | pl.col("has_error"))

    @pa.dataframe_check(error="observed_ttft_s <= observed_e2e_s")
    def ttft_before_end(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(
            (pl.col("observed_ttft_s") <= pl.col("observed_e2e_s") * (1 + 1e-9)).fill_null(True)
        )


# row-level rules with the reason a failing record is quarantined with (same rules as the schema)
ROW_RULES = [
    ("index", pl.col("index").is_not_null() & (pl.col("index") >= 0), "index missing or negative"),
    (
        "arrival_time_us",
        pl.col("arrival_time_us").is_not_null() & pl.col("arrival_time_us").is_between(0, MAX_ARRIVAL_US),
        f"arrival_time_us missing or outside [0, {MAX_ARRIVAL_US}]",
    ),
    (
        "input_tokens",
        pl.col("input_tokens").is_not_null() & pl.col("input_tokens").is_between(0, MAX_TOKENS),
        f"input_tokens missing or outside [0, {MAX_TOKENS}]",
    ),
    (
        "output_tokens",
        pl.col("output_tokens").is_not_null() & pl.col("output_tokens").is_between(0, MAX_TOKENS),
        f"output_tokens missing or outside [0, {MAX_TOKENS}]",
    ),
    ("has_error", pl.col("has_error").is_not_null(), "has_error missing"),
    (
        "input_tokens",
        (pl.col("input_tokens") >= 1) | pl.col("has_error").fill_null(True),
        "input_tokens is 0 on a request without error",
    ),
    (
        "observed_ttft_s",
        pl.col("observed_ttft_s").is_null()
        | (pl.col("observed_ttft_s").is_between(0.0, MAX_LATENCY_S) & pl.col("observed_ttft_s").is_finite()),
        f"ttft_s outside [0, {MAX_LATENCY_S:.0f}] s",
    ),
    (
        "observed_e2e_s",
        pl.col("observed_e2e_s").is_null()
        | (
            (pl.col("observed_e2e_s") > 0)
            & pl.col("observed_e2e_s").is_finite()
            & (pl.col("observed_e2e_s") <= MAX_LATENCY_S)
        ),
        f"e2e_s outside (0, {MAX_LATENCY_S:.0f}] s",
    ),
    (
        "observed_ttft_s",
        pl.col("observed_ttft_s").is_null()
        | pl.col("observed_e2e_s").is_null()
        | (pl.col("observed_ttft_s") <= pl.col("observed_e2e_s") * (1 + 1e-9)),
        "ttft_s > e2e_s",
    ),
]


@dataclass
class RequestLog:
    """A run's request log: header (role, serving config, ...) + one validated row per request."""

    table: pl.DataFrame
    quarantine: pl.DataFrame
    header: dict = field(default_factory=dict)  # experiment, model_short, profile, role, config, model_config
    files: list[str] = field(default_factory=list)  # the files read (relative to the run folder)
    has_ground_truth: bool = False
    records_in: int = 0

    @property
    def role(self) -> str | None:
        return self.header.get("role")

    @property
    def counts(self) -> dict:
        return {
            "records_in": self.records_in,
            "records_kept": self.table.height,
            "records_quarantined": self.quarantine.height,
        }


def find_request_files(folder: Path) -> dict[str, Path]:
    """{'requests': path, 'ground_truth': path, 'lifecycle': path} for the request-log files present."""
    folder = Path(folder)
    out = {}
    for kind, names in (("requests", REQUESTS_FILES), ("ground_truth", GROUND_TRUTH_FILES)):
        found = [folder / n for n in names if (folder / n).is_file()]
        if len(found) > 1:
            raise RequestLogError(f"{folder}: both {found[0].name} and {found[1].name}; keep one")
        if found:
            out[kind] = found[0]
    if (folder / LIFECYCLE_FILE).is_file():
        out["lifecycle"] = folder / LIFECYCLE_FILE
    return out


def has_request_log(folder: Path) -> bool:
    files = find_request_files(folder)
    return "requests" in files or "lifecycle" in files


def _load_json(path: Path):
    """The file's JSON (orjson: 4x faster than json on inference-perf's 160 MB per-request files)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return orjson.loads(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise RequestLogError(f"{path}: cannot read ({e})") from None
    except orjson.JSONDecodeError as e:
        raise RequestLogError(f"{path}: not valid JSON ({e})") from None


def _excerpt(rec) -> str:
    s = json.dumps(rec, default=str)[:120]
    return s.encode("ascii", "backslashreplace").decode()


def _num(x, kind):
    """x as int/float, None if missing or not a number (bools are not numbers)."""
    if isinstance(x, bool) or x is None:
        return None
    if kind is int:
        if isinstance(x, int):
            return x
        if isinstance(x, float) and x.is_integer():
            return int(x)
        return None
    return float(x) if isinstance(x, (int, float)) else None


def _records_table(records: list, file: str, gt: dict[int, dict] | None) -> tuple[pl.DataFrame, list[dict]]:
    """requests.json records → columns; structurally broken records (not an object) → quarantine rows."""
    cols = {
        k: []
        for k in (
            "index",
            "arrival_time_us",
            "input_tokens",
            "output_tokens",
            "prefix_group",
            "has_error",
            "observed_has_error",
            "observed_ttft_s",
            "observed_e2e_s",
            "_record",
        )
    }
    bad = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            bad.append(
                {
                    "file": file,
                    "line": i,
                    "kind": "record",
                    "reason": "record is not a JSON object",
                    "excerpt": _excerpt(r),
                }
            )
            continue
        idx = _num(r.get("index"), int)
        cols["index"].append(idx)
        cols["arrival_time_us"].append(_num(r.get("arrival_time_us"), int))
        cols["input_tokens"].append(_num(r.get("input_tokens"), int))
        cols["output_tokens"].append(_num(r.get("output_tokens"), int))
        pg = r.get("prefix_group")
        cols["prefix_group"].append(pg if isinstance(pg, str) else None)
        he = r.get("has_error")
        cols["has_error"].append(he if isinstance(he, bool) else None)
        g = gt.get(idx) if gt is not None and idx is not None else None
        ghe = g.get("has_error") if g else None
        cols["observed_has_error"].append(ghe if isinstance(ghe, bool) else None)
        cols["observed_ttft_s"].append(_num(g.get("ttft_s"), float) if g else None)
        cols["observed_e2e_s"].append(_num(g.get("e2e_s"), float) if g else None)
        cols["_record"].append(i)
    schema = {**REQUEST_LOG_COLUMNS, "_record": pl.Int64}
    return pl.DataFrame(cols, schema=schema), bad


def _lifecycle_table(records: list, file: str) -> tuple[pl.DataFrame, list[dict]]:
    """inference-perf per-request records → the same columns (arrival from the earliest start)."""
    starts = [
        r.get("start_time")
        for r in records
        if isinstance(r, dict)
        and isinstance(r.get("start_time"), (int, float))
        and not isinstance(r.get("start_time"), bool)
    ]
    t0 = min(starts) if starts else 0.0
    order = sorted(
        range(len(records)),
        key=lambda i: (records[i].get("start_time", 0.0) if isinstance(records[i], dict) else 0.0, i),
    )
    cols = {
        k: []
        for k in (
            "index",
            "arrival_time_us",
            "input_tokens",
            "output_tokens",
            "prefix_group",
            "has_error",
            "observed_has_error",
            "observed_ttft_s",
            "observed_e2e_s",
            "_record",
        )
    }
    bad = []
    for new_idx, i in enumerate(order):
        r = records[i]
        if not isinstance(r, dict) or not isinstance(r.get("info"), dict):
            bad.append(
                {
                    "file": file,
                    "line": i,
                    "kind": "record",
                    "reason": "record is not an inference-perf request object",
                    "excerpt": _excerpt(r),
                }
            )
            continue
        info = r["info"]
        st, en = _num(r.get("start_time"), float), _num(r.get("end_time"), float)
        err = r.get("error") is not None
        times = info.get("output_token_times") or []
        cols["index"].append(new_idx)
        cols["arrival_time_us"].append(int(round((st - t0) * 1e6)) if st is not None else None)
        cols["input_tokens"].append(_num(info.get("input_tokens"), int))
        cols["output_tokens"].append(_num(info.get("output_tokens"), int))
        cols["prefix_group"].append(None)
        cols["has_error"].append(err)
        cols["observed_has_error"].append(err)
        ttft = (
            (float(times[0]) - st)
            if (times and st is not None and _num(times[0], float) is not None and not err)
            else None
        )
        cols["observed_ttft_s"].append(ttft)
        cols["observed_e2e_s"].append((en - st) if (st is not None and en is not None) else None)
        cols["_record"].append(i)
    schema = {**REQUEST_LOG_COLUMNS, "_record": pl.Int64}
    return pl.DataFrame(cols, schema=schema), bad


def validate_records(df: pl.DataFrame, file: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept rows passing RequestLogSchema, quarantine rows with file, record index and the first failing rule)."""
    reason = pl.lit(None, dtype=pl.Utf8)
    for _col, ok, why in reversed(ROW_RULES):
        reason = pl.when(~ok.fill_null(False)).then(pl.lit(why)).otherwise(reason)
    df = df.with_columns(_reason=reason)
    later = pl.col("index").is_not_null() & (pl.col("_record") > pl.col("_record").min().over("index"))
    df = df.with_columns(
        _reason=pl.when(pl.col("_reason").is_null() & later)
        .then(pl.lit("duplicate index (first kept)"))
        .otherwise(pl.col("_reason"))
    )
    bad = df.filter(pl.col("_reason").is_not_null())
    kept = df.filter(pl.col("_reason").is_null()).drop("_reason", "_record").sort("index")
    q = bad.select(
        file=pl.lit(file),
        line=pl.col("_record"),
        kind=pl.lit("record"),
        reason=pl.col("_reason"),
        excerpt=pl.format(
            "index={} arrival_time_us={} input_tokens={} output_tokens={}",
            "index",
            "arrival_time_us",
            "input_tokens",
            "output_tokens",
        ),
    )
    RequestLogSchema.validate(kept)
    return kept, q.cast(QUARANTINE_COLUMNS)


def read_request_log(folder: Path) -> RequestLog | None:
    """The run folder's request log (requests.json[.gz] preferred over inference-perf's per-request file), or None."""
    folder = Path(folder)
    files = find_request_files(folder)
    if "requests" in files:
        path = files["requests"]
        doc = _load_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
            raise RequestLogError(f"{path}: expected an object with a 'requests' list")
        gt, used = None, [path.name]
        if "ground_truth" in files:
            gpath = files["ground_truth"]
            g = _load_json(gpath)
            if not isinstance(g, list):
                raise RequestLogError(f"{gpath}: expected a list of per-request records")
            gt = {r["index"]: r for r in g if isinstance(r, dict) and isinstance(r.get("index"), int)}
            used.append(gpath.name)
        raw, bad = _records_table(doc["requests"], str(path), gt)
        header = {
            "experiment": doc.get("experiment"),
            "model_id": doc.get("model_id"),
            "model_short": doc.get("model_short"),
            "profile": doc.get("profile"),
            "role": doc.get("split") if doc.get("split") in ROLES else None,
            "config": doc.get("config") if isinstance(doc.get("config"), dict) else {},
            "model_config": doc.get("model_config") if isinstance(doc.get("model_config"), dict) else {},
            "format": "requests.json",
        }
        n_in = len(doc["requests"])
        has_gt = gt is not None
    elif "lifecycle" in files:
        path = files["lifecycle"]
        recs = _load_json(path)
        if not isinstance(recs, list):
            raise RequestLogError(f"{path}: expected a list of inference-perf per-request records")
        raw, bad = _lifecycle_table(recs, str(path))
        header = {
            "role": None,
            "config": {},
            "model_config": {},
            "format": "inference-perf per_request_lifecycle_metrics",
        }
        used, n_in, has_gt = [LIFECYCLE_FILE], len(recs), True
    else:
        return None
    kept, q = validate_records(raw, str(path))
    quarantine = pl.concat([pl.DataFrame(bad, schema=QUARANTINE_COLUMNS), q]) if bad else q
    assert kept.height + quarantine.height == n_in, "request records in != kept + quarantined"
    return RequestLog(
        table=kept, quarantine=quarantine, header=header, files=used, has_ground_truth=has_gt, records_in=n_in
    )
