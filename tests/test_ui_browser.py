"""The Dagster UI in a real (headless) Chromium: asset graph shows StepML, one partition materializes.

dagster-webserver on 127.0.0.1 (free port) with a temp DAGSTER_HOME and a one-run data folder; the
instance uses DefaultRunCoordinator so a run launched through the webserver starts without a daemon
(the daemon path is tested in test_daemon.py). The materialization is launched through the
webserver's GraphQL endpoint (the same mutation the "Materialize" button sends); the browser renders
the asset graph, the run and raw_traces' lineage metadata. Screenshots: test-artifacts/ui-*.png.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ops_helpers import ARTIFACTS, REPO, RUN_A, copy_run, free_port, wait_for, write_instance_yaml
from process_group import stop_process_group

pytestmark = pytest.mark.slow
STEPML_ASSETS = [
    "raw_traces",
    "step_table",
    "quarantine",
    "feature_matrix",
    "split",
    "fitted_models",
    "predictions",
    "metrics",
    "run_summary",
    "global_models",
    "study_report",
]
REPO_SELECTOR = {"repositoryLocationName": "stepml", "repositoryName": "__repository__"}


class Webserver:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def gql(self, query: str, **variables) -> dict:
        req = urllib.request.Request(
            f"{self.url}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.load(r)
        assert "errors" not in out, out["errors"]
        return out["data"]


@pytest.fixture
def webserver(tmp_path, real_experiments):
    from cdp import find_chromium

    if find_chromium() is None:
        pytest.skip("headless Chromium not found (apt-get install chromium)")
    home, data, out = tmp_path / "home", tmp_path / "data", tmp_path / "out"
    write_instance_yaml(
        home, "run_coordinator:\n  module: dagster._core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    copy_run(real_experiments / RUN_A, data / RUN_A)
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "STEPML_DATA_DIR": str(data),
        "STEPML_OUT_DIR": str(out),
        "STEPML_SENSOR_STATUS": "stopped",
    }
    log_path = tmp_path / "webserver.log"
    log = open(log_path, "w")
    exe = Path(sys.executable).parent / "dagster-webserver"
    proc = subprocess.Popen(
        [str(exe), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ws = Webserver(f"http://127.0.0.1:{port}", proc, log_path)
    try:

        def up():
            assert proc.poll() is None, "dagster-webserver exited:\n" + log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{ws.url}/server_info", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(up, 120, 1, "dagster-webserver /server_info")
        wait_for(
            lambda: any(
                n["assetKey"]["path"] == ["raw_traces"]
                for n in ws.gql("{ assetNodes { assetKey { path } } }")["assetNodes"]
            ),
            120,
            1,
            "the stepml code location to load",
        )
        yield ws
    finally:
        stop_process_group(proc)  # the webserver's own group: it, its code server, its run
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / "ui-webserver.log")


@pytest.fixture
def browser(webserver):
    from cdp import Browser, find_chromium

    b = Browser(find_chromium(), width=2000, height=1400)
    yield b
    b.close()


def test_ui_shows_assets_and_materializes_a_partition(webserver, browser):
    ws = webserver
    assert ws.url.startswith("http://127.0.0.1:")
    ws.gql("mutation { setNuxSeen }")  # the one-time community pop-up would cover the page
    nodes = {
        "/".join(n["assetKey"]["path"]): n
        for n in ws.gql("{ assetNodes { assetKey { path } groupName } }")["assetNodes"]
    }
    assert set(STEPML_ASSETS) <= set(nodes)

    _see_every_asset_in_the_graph(ws, browser)
    run_id = _launch_experiment_job(ws)
    browser.goto(f"{ws.url}/runs/{run_id}")
    browser.wait_text(["Success"], 60)
    time.sleep(1)
    browser.screenshot(ARTIFACTS / "ui-run.png")
    _check_lineage_metadata(ws, browser)
    _whatif_launchpad_shows_its_typed_config(ws, browser)
    assert (ARTIFACTS / "ui-asset-graph.png").stat().st_size > 10_000


def _whatif_launchpad_shows_its_typed_config(ws, browser) -> None:
    """whatif_job's launchpad renders the WhatIfConfig form with its defaults and no errors; the webserver accepts a
    sweep's config (rates, TPs, SLO) and refuses a mistyped one, naming the path (the launch itself, on a finished
    study, is test_calibration_pipeline.py::test_whatif_asset_materializes_with_its_run_config)."""
    q = """query($p: PipelineSelector!, $c: RunConfigData) {
      isPipelineConfigValid(pipeline: $p, mode: "default", runConfigData: $c) {
        __typename ... on RunConfigValidationInvalid { errors { message } } } }"""
    sel = {**REPO_SELECTOR, "pipelineName": "whatif_job"}
    sweep = {"models": ["llama-2-7b"], "rates": [2.0, 8.0], "tps": [1, 2], "slo": "ttft_p99<2s,itl_p99<100ms"}
    ok = ws.gql(q, p=sel, c={"ops": {"whatif": {"config": sweep}}})["isPipelineConfigValid"]
    assert ok["__typename"] == "PipelineConfigValidationValid", ok
    bad = ws.gql(q, p=sel, c={"ops": {"whatif": {"config": {"rates": "fast"}}}})["isPipelineConfigValid"]
    assert bad["__typename"] == "RunConfigValidationInvalid"
    assert "root:ops:whatif:config:rates must be list" in bad["errors"][0]["message"], bad
    browser.goto(f"{ws.url}/locations/stepml/jobs/whatif_job/playground")
    browser.wait_text(["whatif", "rates:", "tps:", "slo:", "max_num_seqs:", "No errors", "Launch Run"], 90)
    browser.screenshot(ARTIFACTS / "ui-whatif-launchpad.png")


def _see_every_asset_in_the_graph(ws, browser) -> None:
    """The asset graph page with every group expanded shows every StepML asset (panning down over it)."""
    # 1. the asset graph page, every group expanded (⌥E, the UI's "Expand all groups")
    browser.goto(f"{ws.url}/asset-groups")
    collapsed = "document.querySelectorAll('[class*=\"CollapsedGroupNode_collapsedGroupNodeContainer\"]').length"
    expanded = "document.querySelectorAll('[class*=\"ExpandedGroupNode\"]').length"
    browser.wait_js(f"{collapsed} >= 4", 120, "the collapsed group nodes of the asset graph")
    for attempt in range(4):  # the shortcut works once the graph has mounted its key handler: retry
        time.sleep(2)
        browser.key("e", "KeyE", 69, modifiers=1)
        try:
            browser.wait_js(f"{expanded} > 0", 20, "expanded asset groups")
            break
        except TimeoutError:
            browser.screenshot(ARTIFACTS / f"ui-asset-graph-not-expanded-{attempt}.png")
    any_name = " || ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in STEPML_ASSETS)
    try:
        browser.wait_js(f"{expanded} > 0 && ({any_name})", 60, "asset names in the expanded graph")
    finally:
        browser.screenshot(ARTIFACTS / "ui-asset-graph-expanded.png")
    time.sleep(2)
    seen, best = set(), -1
    # the graph renders only nodes in view (their names only above a zoom level): pan down over it (wheel) at the
    # zoom it opened with, until each asset has been shown
    for _ in range(12):
        shown = {n for n in STEPML_ASSETS if n in browser.text()}
        seen |= shown
        if len(shown) > best:
            best = len(shown)
            browser.screenshot(ARTIFACTS / "ui-asset-graph.png")
        if seen == set(STEPML_ASSETS):
            break
        browser.call("Input.dispatchMouseEvent", type="mouseWheel", x=1200, y=600, deltaX=0, deltaY=300, modifiers=0)
        time.sleep(1.5)
    assert seen == set(STEPML_ASSETS), set(STEPML_ASSETS) - seen


def _launch_experiment_job(ws) -> str:
    """Register RUN_A's partition and launch experiment_job for it, as the UI's Materialize button does; its run id, once it succeeded."""
    # 2. register the partition and launch experiment_job for it (what the UI's Materialize button sends)
    r = ws.gql(
        """mutation($k: String!, $repo: RepositorySelector!) {
        addDynamicPartition(repositorySelector: $repo, partitionsDefName: "experiment", partitionKey: $k) {
          __typename ... on PythonError { message } ... on UnauthorizedError { message } } }""",
        k=RUN_A,
        repo=REPO_SELECTOR,
    )
    assert r["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", r
    r = ws.gql(
        """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
          __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
          ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }""",
        p={
            "selector": {**REPO_SELECTOR, "jobName": "experiment_job"},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": RUN_A}]},
        },
    )
    assert r["launchRun"]["__typename"] == "LaunchRunSuccess", r
    run_id = r["launchRun"]["run"]["runId"]

    def finished():
        st = ws.gql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", id=run_id)["runOrError"][
            "status"
        ]
        return st if st in {"SUCCESS", "FAILURE", "CANCELED"} else None

    assert wait_for(finished, 300, 2, f"run {run_id}") == "SUCCESS", ARTIFACTS / "ui-webserver.log"
    return run_id


def _check_lineage_metadata(ws, browser) -> None:
    """Lineage metadata on raw_traces' and quarantine's materializations, via GraphQL and as rendered on raw_traces' page."""
    # 3. lineage metadata on the materialization, via GraphQL and as rendered on raw_traces' page
    meta = ws.gql(
        """query($k: String!) { assetOrError(assetKey: {path: ["raw_traces"]}) { ... on Asset {
        assetMaterializations(partitions: [$k], limit: 1) { partition tags { key value } metadataEntries { label } } } } }""",
        k=RUN_A,
    )["assetOrError"]["assetMaterializations"][0]
    labels = {m["label"] for m in meta["metadataEntries"]}
    assert {
        "source",
        "stands_for",
        "model",
        "workload",
        "tp",
        "files",
        "data_version",
        "lines",
        "lines_quarantined",
        "steps_read",
        "events_by_name",
        "run_folder",
    } <= labels, labels
    assert any(t["key"] == "dagster/data_version" for t in meta["tags"])
    q = ws.gql(
        """query($k: String!) { assetOrError(assetKey: {path: ["quarantine"]}) { ... on Asset {
        assetMaterializations(partitions: [$k], limit: 1) { metadataEntries { label } } } } }""",
        k=RUN_A,
    )
    qlabels = {m["label"] for m in q["assetOrError"]["assetMaterializations"][0]["metadataEntries"]}
    assert {"quarantined_lines", "quarantined_events", "quarantined_rows", "dagster/row_count"} <= qlabels, qlabels
    browser.goto(f"{ws.url}/assets/raw_traces?view=partitions&partition={RUN_A}")
    browser.wait_text(["stands_for", "workload", "data_version"], 90)
    time.sleep(1)
    browser.screenshot(ARTIFACTS / "ui-raw-traces-partition.png")
