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
the quarantine (file, record index, reason): records in = kept + quarantined; truth that fails its rules is
quarantined (kind ``ground_truth``) while its request stays in the load (the load never depends on the truth).

Every file is read as traces are (runs.read_input_bytes: a regular file inside the data root, bounded; gzip within
max_request_bytes and max_inflate_ratio); the header's ``config`` is checked (check_header); the truth is matched
to the requests by index (match_truth). A file that cannot be used raises RequestLogError, one line naming the
file and the key, record or limit: that run fails alone.
"""

# long module: one reader for the request-log formats and their validation, which share the column rules
# (RequestLogSchema) and the kept/quarantined accounting

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandera.polars as pa
import polars as pl

from stepml_core.errors import StepMLError
from stepml_core.gc_pause import gc_paused
from stepml_core.runs.folders import (
    EXP_CONFIG_INT_KEYS,
    LIFECYCLE_FILE,
    REQUESTS_FILES,
    RunMetadataError,
    find_request_entries,
    read_input_bytes,
)
from stepml_core.runs.limits import DEFAULT_LIMITS, InputLimitError, InputLimits

MAX_KV_BLOCKS = 10**9  # KV-cache blocks of one engine, as the step table bounds them (tables.schemas)

RATIO_FLOOR_BYTES = 64 << 20  # as for traces: the inflation ratio is judged once this many bytes are inflated
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


class RequestLogError(StepMLError, ValueError):
    """A request or ground-truth file that cannot be used (unreadable, wrong shape, a header value out of bounds,
    truth that does not match the requests); the message is one line naming the file and the key or record."""


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


# row-level rules with the reason a failing record is quarantined with (same rules as the schema): the request's own
# fields (a failing request is left out of the load) ...
REQUEST_RULES = [
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
]
# ... and the client's observations (a failing one is not scored; its request stays in the load: the simulated load
# never depends on the truth)
TRUTH_RULES = [
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
    ("observed_has_error", pl.col("observed_has_error").is_not_null(), "has_error missing"),
]
ROW_RULES = REQUEST_RULES + TRUTH_RULES
TRUTH_COLUMNS = ("observed_has_error", "observed_ttft_s", "observed_e2e_s")
# header `config` keys: (lowest, highest) as exp-config.yaml's (runs.EXP_CONFIG_INT_KEYS) and the KV-block bound of
# the step table (schemas.MAX_KV_BLOCKS); the simulator's blocks hold 16 tokens, as vLLM's default
HEADER_INT_KEYS: dict[str, tuple[int, int]] = {
    **{k: EXP_CONFIG_INT_KEYS[k] for k in ("tensor_parallelism", "max_num_seqs", "max_num_batched_tokens")},
    "kv_blocks_total_gpu": (1, MAX_KV_BLOCKS),
    "block_size": (16, 16),
    "num_prefix_groups": (0, 1 << 24),
    "users_per_group": (0, 1 << 24),
    "system_prompt_len": (0, 1 << 24),
}
HEADER_VS_EXP_CONFIG = ("tensor_parallelism", "max_num_seqs", "max_num_batched_tokens")


@dataclass
class RequestLog:
    """A run's request log: header (role, serving config, ...) + one validated row per request."""

    table: pl.DataFrame
    quarantine: pl.DataFrame
    header: dict = field(default_factory=dict)  # experiment, model_short, profile, role, config, model_config
    files: list[str] = field(default_factory=list)  # the files read (relative to the run folder)
    has_ground_truth: bool = False
    records_in: int = 0
    truth: dict = field(default_factory=dict)  # truth_in, truth_used, truth_quarantined, requests_without_truth, ...

    @property
    def role(self) -> str | None:
        return self.header.get("role")

    @property
    def counts(self) -> dict:
        return {
            "records_in": self.records_in,
            "records_kept": self.table.height,
            "records_quarantined": int((self.quarantine["kind"] != "ground_truth").sum()),
            **{k: v for k, v in self.truth.items() if isinstance(v, int)},
        }


def find_request_files(folder: Path) -> dict[str, Path]:
    """{'requests': path, 'ground_truth': path, 'lifecycle': path} for the request-log entries present (of any type:
    reading says what a FIFO or directory is); RequestLogError naming both when a run has two forms of one file."""
    try:
        return find_request_entries(folder)
    except RunMetadataError as e:
        raise RequestLogError(str(e)) from None


def has_request_log(folder: Path) -> bool:
    """Whether the folder has an entry named like a request log (never raises: reading says what is wrong)."""
    return any(os.path.lexists(Path(folder) / n) for n in (*REQUESTS_FILES, LIFECYCLE_FILE))


def _inflate(data: bytes, path: Path, limits: InputLimits) -> bytearray:
    """A gzip file's bytes inflated in 16 MiB pieces, within limits.max_request_bytes and limits.max_inflate_ratio
    (judged past 64 MiB inflated); a stream cut short or corrupt is an error naming the file (a log must be whole)."""
    cap, out = limits.max_request_bytes, bytearray()
    d, rest = zlib.decompressobj(wbits=31), data
    try:
        while True:
            piece = d.decompress(rest, 16 << 20)
            out += piece
            rest = d.unconsumed_tail
            consumed = len(data) - len(rest) - len(d.unused_data)  # compressed bytes inflated so far (all members)
            if len(out) > cap:
                raise InputLimitError(
                    f"{path}: inflates to more than {cap} bytes (limit {limits.describe('max_request_bytes')})"
                )
            if len(out) > RATIO_FLOOR_BYTES and len(out) > limits.max_inflate_ratio * max(1, consumed):
                raise InputLimitError(
                    f"{path}: inflates more than {limits.max_inflate_ratio:g}x ({len(out)} bytes from {consumed} "
                    f"compressed; limit {limits.describe('max_inflate_ratio')}): a gzip bomb?"
                )
            if d.eof and d.unused_data:  # the next gzip member
                d, rest = zlib.decompressobj(wbits=31), d.unused_data
            elif d.eof or (not rest and not piece):
                break
    except zlib.error as e:
        raise RequestLogError(f"{path}: corrupt gzip stream after {len(out)} inflated bytes ({e})") from None
    if not d.eof:
        raise RequestLogError(
            f"{path}: truncated gzip stream ({len(out)} bytes inflated before the compressed data ends); "
            "a request log is read whole or not at all"
        )
    return out


def _load_json(path: Path, *, root: Path | None, limits: InputLimits, reads: dict | None = None):
    """The file's JSON, read as every input is (a regular file inside the data root, at most max_request_bytes
    compressed and inflated); its fingerprint as read goes to ``reads`` (orjson: 4x faster than json on
    inference-perf's 160 MB per-request files)."""
    try:
        data = read_input_bytes(
            path,
            root=root,
            max_bytes=limits.max_request_bytes,
            limit="max_request_bytes",
            limits=limits,
            reads=reads,
            folder=path.parent if path.name != Path(LIFECYCLE_FILE).name else path.parent.parent,
        )
    except RunMetadataError as e:
        raise RequestLogError(str(e)) from None
    except OSError as e:
        raise RequestLogError(f"{path}: cannot read ({e.strerror or e})") from None
    raw = _inflate(data, path, limits) if path.suffix == ".gz" else data
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestLogError(f"{path}: not valid JSON ({e})") from None


def _excerpt(rec) -> str:
    s = json.dumps(rec, default=str)[:120]
    return s.encode("ascii", "backslashreplace").decode()


def _num(x, kind):
    """x as int/float, None if missing, not a number (bools are not numbers) or, for an int, outside 64 bits."""
    if isinstance(x, bool) or x is None:
        return None
    if kind is int:
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        return x if isinstance(x, int) and -(1 << 63) <= x < (1 << 63) else None
    return float(x) if isinstance(x, (int, float)) else None


def _start(r) -> float:
    """An inference-perf record's start_time for ordering (0 where missing or not a number)."""
    v = _num(r.get("start_time"), float) if isinstance(r, dict) else None
    return v if v is not None else 0.0


def _not_object(file: str, i: int, r, what: str, kind: str = "record") -> dict:
    return {"file": file, "line": i, "kind": kind, "reason": f"{what} is not a JSON object", "excerpt": _excerpt(r)}


def _records_table(records: list, file: str) -> tuple[pl.DataFrame, list[dict]]:
    """requests.json records → columns (observed_* null: the truth is joined by index); structurally broken records
    (not an object) → quarantine rows."""
    cols = {k: [] for k in ("index", "arrival_time_us", "input_tokens", "output_tokens", "prefix_group", "has_error")}
    rec, bad = [], []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            bad.append(_not_object(file, i, r, "record"))
            continue
        for k in ("index", "arrival_time_us", "input_tokens", "output_tokens"):
            cols[k].append(_num(r.get(k), int))
        pg, he = r.get("prefix_group"), r.get("has_error")
        cols["prefix_group"].append(pg if isinstance(pg, str) else None)
        cols["has_error"].append(he if isinstance(he, bool) else None)
        rec.append(i)
    none = [None] * len(rec)
    df = pl.DataFrame(
        {**cols, **dict.fromkeys(TRUTH_COLUMNS, none), "_record": rec},
        schema={**REQUEST_LOG_COLUMNS, "_record": pl.Int64},
    )
    return df, bad


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
    order = sorted(range(len(records)), key=lambda i: (_start(records[i]), i))
    cols = {k: [] for k in (*REQUEST_LOG_COLUMNS, "_record")}
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


def _truth_table(records: list, file: str) -> tuple[pl.DataFrame, list[dict]]:
    """ground_truth.json records → (index, observed_*, _truth_record), the first record of each index; records that
    are not objects with an index, and later records of an index, → quarantine rows (kind ground_truth)."""
    cols = {k: [] for k in ("index", *TRUTH_COLUMNS, "_truth_record")}
    bad = []
    for i, r in enumerate(records):
        idx = _num(r.get("index"), int) if isinstance(r, dict) else None
        if idx is None or idx < 0:
            why = "truth record is not an object with an index >= 0"
            bad.append({"file": file, "line": i, "kind": "ground_truth", "reason": why, "excerpt": _excerpt(r)})
            continue
        he = r.get("has_error")
        cols["index"].append(idx)
        cols["observed_has_error"].append(he if isinstance(he, bool) else None)
        cols["observed_ttft_s"].append(_num(r.get("ttft_s"), float))
        cols["observed_e2e_s"].append(_num(r.get("e2e_s"), float))
        cols["_truth_record"].append(i)
    schema = {"index": pl.Int64, **{k: REQUEST_LOG_COLUMNS[k] for k in TRUTH_COLUMNS}, "_truth_record": pl.Int64}
    df = pl.DataFrame(cols, schema=schema)
    later = pl.col("_truth_record") > pl.col("_truth_record").min().over("index")
    dup = df.filter(later).select(
        file=pl.lit(file),
        line="_truth_record",
        kind=pl.lit("ground_truth"),
        reason=pl.lit("duplicate index (first kept)"),
        excerpt=pl.format("index={}", "index"),
    )
    return df.filter(~later), bad + dup.to_dicts()


def _few(values, n: int = 5) -> str:
    v = list(values)
    return ", ".join(str(x) for x in v[:n]) + (f", ... ({len(v)} in all)" if len(v) > n else "")


def match_truth(raw: pl.DataFrame, truth: pl.DataFrame, req_file: str, truth_file: str) -> pl.DataFrame:
    """The requests with their truth joined by index. Truth that cannot be matched is refused (RequestLogError
    naming the file and the first indices): records naming no request of the log (truth indexed otherwise, e.g.
    shifted), or a has_error that differs from the request's own (truth of other requests)."""
    first = raw.filter(pl.col("index").is_not_null()).unique("index", keep="first", maintain_order=True)
    orphans = truth.join(first, on="index", how="anti")["index"].sort()
    if orphans.len():
        raise RequestLogError(
            f"{truth_file}: {orphans.len()} of {truth.height} truth record(s) name no request of {Path(req_file).name} "
            f"(index {_few(orphans)}): the truth is not indexed like the requests; refused"
        )
    j = first.select("index", "has_error").join(truth.select("index", "observed_has_error"), on="index")
    differ = j.filter(pl.col("has_error") != pl.col("observed_has_error"))["index"].sort()
    if differ.len():
        raise RequestLogError(
            f"{truth_file}: key has_error differs from {Path(req_file).name}'s on {differ.len()} of {j.height} "
            f"requests (index {_few(differ)}): the truth is not these requests'; refused"
        )
    joined = raw.drop(*TRUTH_COLUMNS).join(truth, on="index", how="left", maintain_order="left")
    later = pl.col("_record") > pl.col("_record").min().over("index")  # the truth goes to the first record of an index
    return joined.with_columns(
        pl.when(later).then(None).otherwise(pl.col(c)).alias(c) for c in (*TRUTH_COLUMNS, "_truth_record")
    )


def _first_failing(rules) -> pl.Expr:
    reason = pl.lit(None, dtype=pl.Utf8)
    for _col, ok, why in reversed(rules):
        reason = pl.when(~ok.fill_null(False)).then(pl.lit(why)).otherwise(reason)
    return reason


def validate_records(df: pl.DataFrame, file: str, truth_file: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept rows passing RequestLogSchema, quarantine rows). A request failing REQUEST_RULES (or a later record of
    an index) is quarantined with file, record index and the first failing rule, and left out of the load; a kept
    request whose observations fail TRUTH_RULES keeps its place in the load, unscored (observed_* null), its truth
    quarantined (kind ground_truth; record of ``truth_file`` when the truth is a file of its own)."""
    df = df.with_columns(_reason=_first_failing(REQUEST_RULES))
    later = pl.col("index").is_not_null() & (pl.col("_record") > pl.col("_record").min().over("index"))
    df = df.with_columns(
        _reason=pl.when(pl.col("_reason").is_null() & later)
        .then(pl.lit("duplicate index (first kept)"))
        .otherwise(pl.col("_reason"))
    )
    bad = df.filter(pl.col("_reason").is_not_null())
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
    kept, tq = _validate_truth(df.filter(pl.col("_reason").is_null()), file, truth_file)
    if truth_file is not None:  # truth records whose request was left out: not used, counted
        tq = pl.concat([tq, _truth_of_quarantined(bad, truth_file)])
    RequestLogSchema.validate(kept)
    return kept, pl.concat([q.cast(QUARANTINE_COLUMNS), tq.cast(QUARANTINE_COLUMNS)])


def _validate_truth(kept: pl.DataFrame, file: str, truth_file: str | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    has_truth = (
        pl.col("_truth_record").is_not_null()
        if "_truth_record" in kept.columns
        else pl.any_horizontal(*(pl.col(c).is_not_null() for c in TRUTH_COLUMNS))
    )
    kept = kept.with_columns(_truth_reason=pl.when(has_truth).then(_first_failing(TRUTH_RULES)))
    line = pl.col("_truth_record") if "_truth_record" in kept.columns else pl.col("_record")
    tq = kept.filter(pl.col("_truth_reason").is_not_null()).select(
        file=pl.lit(truth_file or file),
        line=line,
        kind=pl.lit("ground_truth"),
        reason=pl.col("_truth_reason") + pl.lit(" (the request is replayed, not scored)"),
        excerpt=pl.format("index={} ttft_s={} e2e_s={}", "index", "observed_ttft_s", "observed_e2e_s"),
    )
    void = pl.col("_truth_reason").is_not_null()
    kept = kept.with_columns(*(pl.when(void).then(None).otherwise(pl.col(c)).alias(c) for c in TRUTH_COLUMNS))
    drop = [c for c in ("_reason", "_record", "_truth_reason", "_truth_record") if c in kept.columns]
    return kept.drop(drop).sort("index"), tq


def _truth_of_quarantined(bad: pl.DataFrame, truth_file: str) -> pl.DataFrame:
    t = bad.filter(pl.col("_truth_record").is_not_null())
    return t.select(
        file=pl.lit(truth_file),
        line="_truth_record",
        kind=pl.lit("ground_truth"),
        reason=pl.format("its request (record {}) was quarantined", "_record"),
        excerpt=pl.format("index={}", "index"),
    )


def check_header(doc: dict, path: Path, exp_config: dict | None = None) -> dict:
    """The request file's header (experiment, model, profile, role, config, model_config), its ``config`` values
    within the bounds exp-config.yaml's get (HEADER_INT_KEYS) and equal to exp-config.yaml's where both say
    (HEADER_VS_EXP_CONFIG); RequestLogError naming the file and every key otherwise (one line)."""
    problems = []
    cfg = doc.get("config", {})
    if not isinstance(cfg, dict):
        problems.append(f"key config: expected a mapping of serving settings, got {_short(cfg)}")
        cfg = {}
    for k, (lo, hi) in HEADER_INT_KEYS.items():
        v = cfg.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"key config.{k}: expected an integer from {lo} to {hi}, got {_short(v)}")
        elif not lo <= v <= hi:
            problems.append(f"key config.{k}: {v} is outside {lo}..{hi}")
    bad = {p.split(":")[0].removeprefix("key config.") for p in problems}
    for k in HEADER_VS_EXP_CONFIG:
        ev, hv = (exp_config or {}).get(k), cfg.get(k)
        if ev is not None and hv is not None and ev != hv and k not in bad:
            problems.append(f"key config.{k}: {hv}, but exp-config.yaml says {ev} (one run has one setting)")
    split = doc.get("split")
    if split is not None and split not in ROLES:
        problems.append(f"key split: {_short(split)} is not one of {', '.join(ROLES)}")
    if problems:
        raise RequestLogError(f"{path}: " + "; ".join(problems))
    mc = doc.get("model_config")
    return {
        **{k: doc.get(k) if isinstance(doc.get(k), str) else None for k in ("experiment", "model_id", "model_short")},
        "profile": doc.get("profile") if isinstance(doc.get("profile"), str) else None,
        "role": split,
        "config": cfg,
        "model_config": mc if isinstance(mc, dict) else {},
        "format": "requests.json",
    }


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _read_requests_json(files: dict, kw: dict, exp_config: dict | None) -> tuple:
    """(header, raw table with truth joined, structural quarantine rows, records in, files used, truth file)."""
    path = files["requests"]
    doc = _load_json(path, **kw)
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list):
        raise RequestLogError(f"{path}: expected an object with a 'requests' list")
    if not doc["requests"]:
        raise RequestLogError(f"{path}: key requests: the list is empty (nothing to replay)")
    header = check_header(doc, path, exp_config)
    raw, bad = _records_table(doc["requests"], str(path))
    used, truth_file, truth_in = [path.name], None, 0
    if "ground_truth" in files:
        gpath = files["ground_truth"]
        g = _load_json(gpath, **kw)
        if not isinstance(g, list):
            raise RequestLogError(f"{gpath}: expected a list of per-request records")
        truth, tbad = _truth_table(g, str(gpath))
        raw = match_truth(raw, truth, str(path), str(gpath))
        bad += tbad
        used.append(gpath.name)
        truth_file, truth_in = str(gpath), len(g)
    return header, raw, bad, len(doc["requests"]), used, truth_file, truth_in


@gc_paused()  # a run's records: many small objects, no cycles (stepml_core.gc_pause)
def read_request_log(
    folder: Path,
    *,
    data_root: Path | None = None,
    limits: InputLimits | None = None,
    exp_config: dict | None = None,
    reads: dict | None = None,
) -> RequestLog | None:
    """The run folder's request log (requests.json[.gz] preferred over inference-perf's per-request file), or None.

    Every file is read as traces are: a regular file inside the data root (default: the folder's parent), within
    ``limits`` (max_request_bytes, max_inflate_ratio); its fingerprint as read goes to ``reads``. The header is
    checked (check_header, against ``exp_config`` when given); ground truth is matched by index (match_truth)."""
    folder = Path(folder)
    kw = dict(root=Path(data_root) if data_root is not None else folder.parent, limits=limits or DEFAULT_LIMITS)
    kw["reads"] = reads
    files = find_request_files(folder)
    truth_file, truth_in = None, 0
    if "requests" in files:
        path = files["requests"]
        header, raw, bad, n_in, used, truth_file, truth_in = _read_requests_json(files, kw, exp_config)
        has_gt = truth_file is not None
    elif "lifecycle" in files:
        path = files["lifecycle"]
        recs = _load_json(path, **kw)
        if not isinstance(recs, list):
            raise RequestLogError(f"{path}: expected a list of inference-perf per-request records")
        if not recs:
            raise RequestLogError(f"{path}: the list of per-request records is empty (nothing to replay)")
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
    kept, q = validate_records(raw, str(path), truth_file)
    quarantine = pl.concat([pl.DataFrame(bad, schema=QUARANTINE_COLUMNS), q]) if bad else q
    if kept.height == 0:
        reason = quarantine["reason"][0] if quarantine.height else "none kept"
        raise RequestLogError(f"{path}: no usable request: all {n_in} quarantined (first: {reason})")
    _check_span(kept, quarantine, path, limits or DEFAULT_LIMITS)
    truth = _truth_counts(kept, quarantine, truth_file, truth_in, has_gt)
    log = RequestLog(
        table=kept, quarantine=quarantine, header=header, files=used, has_ground_truth=has_gt, records_in=n_in
    )
    log.truth = truth
    c = log.counts
    assert c["records_kept"] + c["records_quarantined"] == n_in, "request records in != kept + quarantined"
    assert truth.get("truth_in", 0) == truth.get("truth_used", 0) + truth.get("truth_quarantined", 0)
    return log


def _check_span(kept: pl.DataFrame, q: pl.DataFrame, path: Path, limits: InputLimits) -> None:
    """InputLimitError naming the file, the latest request and the limit when the arrivals span more than
    limits.max_request_span_s."""
    a = kept["arrival_time_us"]
    span_s = (a.max() - a.min()) * 1e-6
    if span_s > limits.max_request_span_s:
        last = kept.sort("arrival_time_us")["index"][-1]
        raise InputLimitError(
            f"{path}: arrivals span {span_s:.0f} s (request index {last} at {a.max() * 1e-6:.0f} s; limit "
            f"{limits.describe('max_request_span_s')})"
        )


def _truth_counts(kept: pl.DataFrame, q: pl.DataFrame, truth_file: str | None, truth_in: int, has_gt: bool) -> dict:
    """Truth records in = used + quarantined; the requests without truth (not scored) counted and the first named."""
    if not has_gt:
        return {}
    used = int(kept["observed_has_error"].is_not_null().sum())
    tq = int((q["kind"] == "ground_truth").sum())
    without = kept.filter(pl.col("observed_has_error").is_null())["index"]
    return {
        "truth_in": truth_in if truth_file is not None else used + tq,
        "truth_used": used,
        "truth_quarantined": tq,
        "requests_without_truth": without.len(),
        "first_without_truth": without.head(10).to_list(),
    }
