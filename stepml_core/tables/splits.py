"""Temporal 60/20/20 split by step id within one experiment, with load stages.

n_train = round(0.6 n), n_valid = round(0.2 n) (Python's round, as the original
study's splits.py), the rest test; blocks are contiguous in step-id order, no gap.
A row's load stage is the client stage whose time window holds its step start,
measured from the run's first sampled step.

The temporal split puts the runs' low-rate first stage mostly in train and the high-rate
stage in valid and test. Two other schemes measure what that costs (report only; H1 uses
the temporal split):
  stage_matched — the temporal 60/20/20 rule applied within each load stage, blocks united:
                  every block has the run's stage mix and test is still the future of train
                  within each stage;
  random        — a seeded random 60/20/20 assignment of rows (same sizes): neighbouring
                  steps fall in train and test, an optimistic bound.
"""

from __future__ import annotations

import numpy as np
import polars as pl

SPLITS = ("train", "valid", "test")


def split_sizes(n: int, train: float = 0.6, valid: float = 0.2) -> tuple[int, int, int]:
    n_tr, n_va = int(round(train * n)), int(round(valid * n))
    return n_tr, n_va, n - n_tr - n_va


def temporal_split(step_ids: np.ndarray) -> np.ndarray:
    """Labels 'train'/'valid'/'test' for step ids (any order), by rank of step id."""
    step_ids = np.asarray(step_ids)
    n_tr, n_va, _ = split_sizes(len(step_ids))
    rank = np.empty(len(step_ids), dtype=np.int64)
    rank[np.argsort(step_ids, kind="stable")] = np.arange(len(step_ids))
    return np.where(rank < n_tr, "train", np.where(rank < n_tr + n_va, "valid", "test"))


def stage_matched_split(step_ids: np.ndarray, stages: np.ndarray) -> np.ndarray:
    """Temporal 60/20/20 labels computed within each load stage (by step id), see the module docstring."""
    step_ids, stages = np.asarray(step_ids), np.asarray(stages)
    out = np.empty(len(step_ids), dtype=object)
    for st in np.unique(stages):
        m = stages == st
        out[m] = temporal_split(step_ids[m])
    return out.astype(str)


def random_split(step_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A seeded random 60/20/20 assignment with the sizes of `split_sizes`."""
    n = len(step_ids)
    n_tr, n_va, _ = split_sizes(n)
    rank = np.random.default_rng(seed).permutation(n)
    return np.where(rank < n_tr, "train", np.where(rank < n_tr + n_va, "valid", "test"))


def load_stage(ts_start_ns: np.ndarray, stage_durations_s: list[float]) -> np.ndarray:
    """Stage index (0-based) of each step from its monotonic start time."""
    ts = np.asarray(ts_start_ns, dtype=np.int64)
    if not stage_durations_s or len(ts) == 0:
        return np.zeros(len(ts), dtype=np.int64)
    t_s = (ts - ts.min()) / 1e9
    bounds = np.cumsum(stage_durations_s)[:-1]
    return np.searchsorted(bounds, t_s, side="right").astype(np.int64)


def split_table(steps: pl.DataFrame, stage_durations_s: list[float]) -> pl.DataFrame:
    """step.id → split, load_stage for one experiment's kept steps."""
    s = steps.select("step.id", "step.ts_start_ns").sort("step.id")
    return s.select(
        "step.id",
        split=pl.Series(temporal_split(s["step.id"].to_numpy())),
        load_stage=pl.Series(load_stage(s["step.ts_start_ns"].to_numpy(), stage_durations_s)),
    )


def split_summary(split: pl.DataFrame) -> list[dict]:
    """Per split block: n, step-id range and the share of rows in each load stage."""
    out = []
    for name in SPLITS:
        b = split.filter(pl.col("split") == name)
        if b.height == 0:
            out.append({"split": name, "n": 0})
            continue
        stages = b["load_stage"].value_counts().sort("load_stage")
        out.append(
            {
                "split": name,
                "n": b.height,
                "first_step": int(b["step.id"].min()),
                "last_step": int(b["step.id"].max()),
                "stage_share": {
                    f"stage_{int(r['load_stage'])}": round(r["count"] / b.height, 4)
                    for r in stages.iter_rows(named=True)
                },
            }
        )
    return out


def stage_mix(split: pl.DataFrame, column: str = "split") -> pl.DataFrame:
    """Long table: block, load_stage, n rows, share of the block's rows, for one split labelling."""
    if split.height == 0:
        return pl.DataFrame(schema={"block": pl.Utf8, "load_stage": pl.Int64, "n": pl.Int64, "share": pl.Float64})
    return (
        split.group_by(pl.col(column).alias("block"), "load_stage")
        .agg(n=pl.len())
        .with_columns(share=pl.col("n") / pl.col("n").sum().over("block"))
        .with_columns(pl.col("n").cast(pl.Int64), pl.col("load_stage").cast(pl.Int64))
        .sort("block", "load_stage")
    )
