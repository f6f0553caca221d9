"""A new user's first hour (issue 12): the first mistakes give one clear line, write nothing they did not
ask for, and each study keeps its own Dagster instance with the settings deploy/dagster.yaml promises.

Each test names the point of the issue it covers. Built from one small synthetic run (scale 0.03).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from process_group import stop_process_group

import stepml_dagster.cli as cli
import stepml_dagster.local as local
from stepml_core.errors import StepMLError, UsageError
from stepml_core.progress import make_progress
from stepml_core.synth import synthesize_runs
from stepml_dagster.instance import INSTANCE_CONFIG, ensure_instance_config, ui_command

REPO = Path(__file__).resolve().parents[1]
BASE_REAL_ID = "20260217-155451-llama-2-7b-tp1-codegen"
CONTENTS = "traces.json[.gz] or requests.json[.gz] plus exp-config.yaml"


def rid(n: int, model: str = "llama-2-7b") -> str:
    return f"20260301-{n:06d}-{model}-tp1-codegen-synth"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    [src] = synthesize_runs(tmp_path_factory.mktemp("base"), [BASE_REAL_ID], scale=0.03, seed=5, workers=1)
    return src


def make_data(root: Path, small_run: Path, runs: dict[str, str]) -> Path:
    """runs: {run id: 'good' | 'bad_meta' (unknown model, no exp-config.yaml) | 'corrupt_gz'}."""
    root.mkdir(parents=True, exist_ok=True)
    for name, kind in runs.items():
        d = root / name
        shutil.copytree(small_run, d)
        if kind == "bad_meta":
            (d / "exp-config.yaml").unlink()
        elif kind == "corrupt_gz":
            body = bytearray((d / "traces.json.gz").read_bytes())  # bits flipped mid-stream (a copy cut short
            for i in range(len(body) // 2, len(body) // 2 + 64):  # keeps the lines before the damage instead)
                body[i] ^= 0x5A
            (d / "traces.json.gz").write_bytes(bytes(body))
    return root


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip()]


@pytest.fixture
def no_dagster_home(monkeypatch):
    """As a new user: DAGSTER_HOME not set (the test session sets one for every other test)."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


# ------------------------------------------------------------------------------ 1. no surprises on disk
@pytest.mark.parametrize("case", ["missing", "unrelated"])
def test_run_refuses_a_folder_without_run_folders_and_writes_nothing(case, tmp_path, capfd, no_dagster_home):
    data, out = tmp_path / "typo", tmp_path / "out"
    if case == "unrelated":
        (data / "not-a-run").mkdir(parents=True)
        (data / "notes.txt").write_text("hello\n")
        (data / rid(9)).mkdir()
        (data / rid(9) / "exp-config.yaml").write_text("model: x\n")  # a run-id name but no traces
    before = tree(tmp_path)
    rc = cli.main(["run", "--data", str(data), "--out", str(out)])
    cap = capfd.readouterr()
    assert rc == 2
    assert cap.out == "" and len(lines(cap.err)) == 1, cap.err
    [line] = lines(cap.err)
    assert str(data) in line and CONTENTS in line and "YYYYMMDD-HHMMSS-<model>-tp<N>-<workload>" in line
    assert ("no such folder" in line) == (case == "missing")
    assert tree(tmp_path) == before  # not the data folder, not --out, not an instance


class _Synthesized(Exception):
    pass


@pytest.mark.parametrize(
    "argv,synthesizes",
    [
        ([], True),  # the project's default data folder, empty: synthesize there
        (["--no-synth"], False),
        (["--data", "{other}"], False),  # any other folder: only when asked
        (["--data", "{other}", "--synth"], True),
    ],
)
def test_run_synthesizes_only_into_the_default_folder_or_when_asked(
    argv, synthesizes, tmp_path, monkeypatch, capfd, no_dagster_home
):
    default, other = tmp_path / "default", tmp_path / "other"
    calls = []

    def fake_synthesize(out_dir, runs, **kw):
        calls.append(Path(out_dir))
        raise _Synthesized

    monkeypatch.setattr(cli, "DEFAULT_EXPERIMENTS_DIR", default)
    monkeypatch.setattr(local, "synthesize", fake_synthesize)  # what run_study calls (stepml_dagster/local.py)
    argv = ["run", "--out", str(tmp_path / "out")] + [a.format(other=other) for a in argv]
    if synthesizes:
        with pytest.raises(_Synthesized):
            cli.main(argv)
        assert calls == [other if "--data" in argv else default]
    else:
        assert cli.main(argv) == 2 and calls == []
        assert not other.exists() and not default.exists()


def test_help_says_what_run_does_on_an_empty_folder(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default folder (data/experiments) gets the 16 synthetic runs" in text
    assert "any other folder is refused with exit code 2 and nothing written, unless --synth is given" in text
    assert CONTENTS in text


# ------------------------------------------------------------------------------ 2. one clear line per mistake
def test_one_line_per_failing_run_and_the_study_goes_on(small_run, tmp_path, capfd, no_dagster_home):
    """Before: 181 lines with two tracebacks. Now: one line per failing run with all its problems."""
    bad, corrupt, good = rid(1, "mystery-7b"), rid(2), rid(3)
    data = make_data(tmp_path / "data", small_run, {bad: "bad_meta", corrupt: "corrupt_gz", good: "good"})
    rc = cli.main(["run", "--data", str(data), "--out", str(tmp_path / "out")])  # default: 2 worker processes
    cap = capfd.readouterr()
    err = lines(cap.err)
    assert rc == 1
    [bad_line] = [l for l in err if bad in l]
    assert "model 'mystery-7b' is not in the catalogue" in bad_line and f"{bad}/exp-config.yaml: missing" in bad_line
    [corrupt_line] = [l for l in err if corrupt in l and l.startswith("runs [")]
    assert "FAILED" in corrupt_line and "traces.json.gz: corrupt gzip stream" in corrupt_line
    assert "TraceReadError" not in corrupt_line
    [good_line] = [l for l in err if good in l and l.startswith("runs [")]
    assert ": ok (" in good_line
    assert not re.search(r"Traceback|Stack Trace|dagster - ERROR", cap.out + cap.err)
    # nothing else: the instance's place, one line per run and phase (runs, calibrations from the request logs,
    # replay of the request logs) and the phases' wall and CPU seconds
    assert all(
        l == bad_line or l.startswith(("Dagster instance: ", "runs [", "calibration [", "replay [", "phases ("))
        for l in err
    ), cap.err
    [phases] = [l for l in err if l.startswith("phases (")]
    assert all(f"{p} " in phases for p in ("runs", "models", "replay", "study", "total")), phases
    assert len(lines(cap.out)) == 2, cap.out
    assert "study: ok; 1 of 3 experiment(s)" in cap.out
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_study_whose_runs_all_fail_exits_with_a_clear_message(verbose, small_run, tmp_path, capfd, no_dagster_home):
    """Before: the study ran anyway and died with `ValueError: cannot concat empty list`."""
    data = make_data(tmp_path / "data", small_run, {rid(2): "corrupt_gz"})
    out = tmp_path / "out"
    rc = cli.main(
        ["run", "--data", str(data), "--out", str(out), "--workers", "1"] + (["--verbose"] if verbose else [])
    )
    cap = capfd.readouterr()
    assert rc == 2
    assert lines(cap.err)[-1] == (
        f"stepml run: no usable run in {data}: all 1 run(s) failed (one line each above); no study was run"
    )
    assert "cannot concat" not in cap.err
    assert bool(re.search(r"Stack Trace|Traceback", cap.err)) == verbose  # tracebacks with --verbose only
    if not verbose:
        assert len(lines(cap.err)) == 3  # where the instance is, the failed run, the verdict
    assert not (out / "report.md").exists()


def test_runs_with_problems_only_are_refused_before_anything_is_written(small_run, tmp_path, capfd, no_dagster_home):
    bad = rid(1, "mystery-7b")
    data = make_data(tmp_path / "data", small_run, {bad: "bad_meta"})
    out = tmp_path / "out"
    assert cli.main(["run", "--data", str(data), "--out", str(out)]) == 2
    err = lines(capfd.readouterr().err)
    assert len(err) == 2 and err[0].startswith(f"{bad}: not run: ") and "exp-config.yaml: missing" in err[0]
    assert err[1].startswith(f"stepml run: no usable run in {data}: all 1 run folder(s) have problems")
    assert not out.exists()


def test_library_errors_are_one_family():
    from stepml_core.catalog import UnknownModelError
    from stepml_core.runs.folders import RunIdError, RunMetadataError
    from stepml_core.traces import TraceReadError
    from stepml_dagster.local import BackfillError

    for cls in (UnknownModelError, RunIdError, RunMetadataError, TraceReadError, BackfillError, UsageError):
        assert issubclass(cls, StepMLError) and not issubclass(cls, SystemExit), cls


# ------------------------------------------------------------------------------ 3. + 4. one instance per study
@pytest.fixture(scope="module")
def two_studies(small_run, tmp_path_factory):
    """Study A (two runs, no DAGSTER_HOME) and study B (one run, DAGSTER_HOME set by the user)."""
    base = tmp_path_factory.mktemp("studies")
    data_a = make_data(base / "data_a", small_run, {rid(1): "good", rid(2): "good"})
    data_b = make_data(base / "data_b", small_run, {rid(3): "good"})
    out_a, out_b, home_b = base / "out_a", base / "out_b", base / "my_home"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DAGSTER_HOME", raising=False)
        stdout, stderr = io.StringIO(), io.StringIO()
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)
        rc_a = cli.main(["run", "--data", str(data_a), "--out", str(out_a), "--workers", "1"])
        mp.setenv("DAGSTER_HOME", str(home_b))
        rc_b = cli.main(["run", "--data", str(data_b), "--out", str(out_b), "--workers", "1"])
    return {
        "data_a": data_a,
        "out_a": out_a,
        "data_b": data_b,
        "out_b": out_b,
        "home_b": home_b,
        "rc": (rc_a, rc_b),
        "stdout": stdout.getvalue(),
        "stderr": stderr.getvalue(),
    }


def partitions(home: Path) -> list[str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            return sorted(instance.get_dynamic_partitions("experiment"))


def test_each_study_keeps_its_own_instance_and_says_where(two_studies):
    s = two_studies
    assert s["rc"] == (0, 0), s["stderr"]
    home_a = (s["out_a"] / "dagster_home").resolve()
    assert (
        f"Dagster instance: {home_a}\n" in s["stderr"] and f"Dagster instance: {s['home_b'].resolve()}\n" in s["stderr"]
    )
    assert f"stepml ui --data {s['data_a']} --out {s['out_a']}" in s["stdout"]
    assert partitions(home_a) == [rid(1), rid(2)]
    assert partitions(s["home_b"]) == [rid(3)]  # DAGSTER_HOME set by the user: used, nothing under --out
    assert not (s["out_b"] / "dagster_home").exists()
    # one line per finished partition, not a log of progress lines
    assert len([l for l in s["stderr"].splitlines() if l.startswith("runs [")]) == 3


def test_a_removed_run_leaves_the_study_instance(two_studies, capfd, monkeypatch):
    """Before: the UI listed partitions of deleted and unrelated folders next to the real ones."""
    s = two_studies
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    data = s["data_a"].parent / "data_a2"
    shutil.copytree(s["data_a"], data)
    shutil.rmtree(data / rid(2))
    out = s["out_a"].parent / "out_a2"
    shutil.copytree(s["out_a"], out)  # the same study's instance and outputs, moved beside
    assert cli.main(["run", "--data", str(data), "--out", str(out), "--workers", "1"]) == 0
    capfd.readouterr()
    assert partitions(out / "dagster_home") == [rid(1)]
    metrics = (out / "metrics.csv").read_text()
    assert rid(1) in metrics and rid(2) not in metrics


def test_the_instance_gets_deploy_dagster_yaml(two_studies, tmp_path):
    """Before: `stepml run` wrote its own minimal dagster.yaml, so `cp -n deploy/dagster.yaml` did nothing
    and the 2-run cap never applied."""
    home = (two_studies["out_a"] / "dagster_home").resolve()
    assert (home / "dagster.yaml").read_bytes() == INSTANCE_CONFIG.read_bytes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(home))
        with dg.DagsterInstance.get() as instance:
            assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "dagster.yaml").write_text(
        "# StepML default: embedded SQLite storage under DAGSTER_HOME\ntelemetry:\n  enabled: false\n"
    )
    ensure_instance_config(legacy)  # an instance an older `stepml run` made gets the settings too
    assert (legacy / "dagster.yaml").read_bytes() == INSTANCE_CONFIG.read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "dagster.yaml").write_text("storage:\n  postgres: {}\n")
    ensure_instance_config(mine)  # the user's own instance file is left alone
    assert (mine / "dagster.yaml").read_text() == "storage:\n  postgres: {}\n"


def test_ui_command_is_dg_dev_on_the_study_instance(two_studies, monkeypatch, capfd):
    s = two_studies
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    argv, env = ui_command(s["data_a"], s["out_a"], port=3999)
    assert Path(argv[0]).name == "dg" and argv[1] == "dev"
    assert argv[argv.index("-h") + 1] == "127.0.0.1" and argv[argv.index("-w") + 1] == str(REPO / "workspace.yaml")
    assert env["DAGSTER_HOME"] == str((s["out_a"] / "dagster_home").resolve())
    assert env["STEPML_DATA_DIR"] == str(s["data_a"].resolve()) and env["STEPML_OUT_DIR"] == str(s["out_a"].resolve())
    assert cli.main(["ui", "--data", str(s["data_a"] / "nope"), "--out", str(s["out_a"])]) == 2
    [line] = lines(capfd.readouterr().err)
    assert "nope: no such folder" in line


def test_readme_ui_commands_use_the_study_instance_and_dg_dev():
    readme = (REPO / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S))
    commands = [l.strip() for l in blocks.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert not [c for c in commands if c.startswith("dagster dev")]  # superseded by `dg dev`
    assert "stepml ui" in blocks
    assert not [c for c in commands if "DAGSTER_HOME=$PWD/.dagster_home" in c]  # not one instance for every study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"]


@pytest.mark.slow
def test_stepml_ui_shows_exactly_this_studys_runs_with_the_promised_settings(two_studies, tmp_path):
    """The README's UI command after `stepml run`: the UI lists the study's runs (not study B's) and has the
    instance settings of deploy/dagster.yaml (at most 2 runs at once)."""
    s, port = two_studies, _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    log = open(tmp_path / "ui.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stepml_dagster.cli",
            "ui",
            "--data",
            str(s["data_a"]),
            "--out",
            str(s["out_a"]),
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
                time.sleep(1)
        data = _graphql(
            port,
            '{ assetNodeOrError(assetKey: {path: ["raw_traces"]}) { ... on AssetNode { partitionKeys } }'
            " instance { runQueueConfig { maxConcurrentRuns } } }",
        )
        assert sorted(data["assetNodeOrError"]["partitionKeys"]) == [rid(1), rid(2)]
        assert data["instance"]["runQueueConfig"]["maxConcurrentRuns"] == 2
    finally:
        stop_process_group(proc, signal.SIGINT)  # SIGINT, as Ctrl-C: dg dev stops the webserver and daemon
        log.close()
    assert "SupersessionWarning" not in (tmp_path / "ui.log").read_text()


# ------------------------------------------------------------------------------ 5. what it costs
def test_readme_counts_the_tests_that_need_the_real_runs_and_they_skip_without_them(tmp_path):
    readme = " ".join((REPO / "README.md").read_text().split())
    m = re.search(r"(\d+) tests \(`pytest -m real`\) need `\.\./shared/real`", readme)
    assert m, "README: say how many tests need ../shared/real"
    env = {**os.environ, "STEPML_SHARED_REAL": str(tmp_path / "absent")}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "real", "-p", "no:cacheprovider", str(REPO / "tests")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and re.search(rf"\b{m.group(1)} skipped\b", summary) and "passed" not in summary, summary


# ------------------------------------------------------------------------------ 7. progress
def test_progress_not_a_terminal_prints_one_line_per_finished_item():
    buf = io.StringIO()
    with make_progress(3, "synth", stream=buf) as p:
        for item in ("a", "b", "c"):
            for f in (0.0, 0.2, 0.5, 0.9):
                p.update(item, f)
            p.update(item, 1.0)
            p.update(item, 1.0)  # a repeated "done" counts once
    assert buf.getvalue().splitlines() == ["synth [1/3] a", "synth [2/3] b", "synth [3/3] c"]


def test_progress_on_a_terminal_draws_one_bar():
    buf = io.StringIO()
    with make_progress(3, "runs", stream=buf, tty=True) as p:
        p.advance("a: ok")
        p.advance("b: FAILED (1.0 s): broken", persist=True)
        p.advance("c: ok")
    text = buf.getvalue()
    assert "\r" in text and "3/3" in text and "━" in text  # redrawn in place
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert "runs [2/3] b: FAILED (1.0 s): broken\n" in plain  # a failure stays above the bar
    assert "runs [1/3] a: ok" not in plain


def test_synth_log_has_one_line_per_run(tmp_path, capfd):
    """Before: 162 progress lines for 16 runs in a log."""
    ids = [BASE_REAL_ID, "20260217-162547-llama-2-7b-tp1-roleplay"]
    assert cli.main(["synth", "--out", str(tmp_path / "runs"), "--runs", *ids, "--scale", "0.01"]) == 0
    cap = capfd.readouterr()
    err = lines(cap.err)
    assert [l.split("] ")[0] for l in err] == ["synth [1/2", "synth [2/2"], cap.err
    assert sorted(l.split("] ")[1] for l in err) == sorted(f"{r}-synth" for r in ids)
    assert lines(cap.out) == [f"wrote 2 run folder(s) under {tmp_path / 'runs'}"]


def test_phase_clock_sums_wall_and_cpu_seconds_per_phase():
    from stepml_core.progress import PhaseClock

    clock = PhaseClock()
    for _ in range(2):
        with clock.phase("busy"):
            sum(i * i for i in range(200_000))  # CPU time
    with clock.phase("idle"):
        pass
    assert list(clock.phases) == ["busy", "idle"]
    wall, cpu = clock.phases["busy"]
    assert wall > 0 and cpu > 0 and clock.phases["idle"][1] >= 0
    line = clock.summary()
    assert line.startswith("phases (wall s / CPU s): busy ") and "; idle " in line and "; total " in line
