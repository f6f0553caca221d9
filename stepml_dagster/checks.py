"""Asset check results from stepml_core.tables.data_checks outcomes (the checks themselves are pure functions there)."""

from __future__ import annotations

import dagster as dg

from stepml_core.tables.data_checks import CheckOutcome


def check_result(outcome: CheckOutcome, name: str | None = None, asset: str | None = None, **kw) -> dg.AssetCheckResult:
    """A stepml_core.tables.data_checks outcome as Dagster's check result (lists and dicts as JSON metadata)."""
    meta = {k: dg.MetadataValue.json(v) if isinstance(v, (dict, list)) else v for k, v in outcome.metadata.items()}
    names = {"check_name": name, "asset_key": asset} if name else {}
    return dg.AssetCheckResult(passed=outcome.passed, metadata=meta, **names, **kw)
