"""The study's outputs stay the same through refactoring (issue 14): metrics.csv, verdict.json, replay.csv
and report.md of a seeded synthetic study and of a study on the shared real runs, against stored copies.

The stored copies (tests/golden/) were written by this test on main before the refactoring began
(`STEPML_UPDATE_GOLDEN=1 python -m pytest tests/test_outputs_unchanged.py`); a change of behaviour shows
as a unified diff of the file that moved. Regenerate them only for a deliberate change of output, in
its own commit that says why. The real study's copies are stored as sha256 digests only (figures from
../shared/real stay out of the repository); the synthetic study's as files. The output folder's path is
written as <out> in the report, so the copies do not depend on where the test runs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from stepml_core.synth import synthesize_runs
from stepml_dagster.cli import run_study

pytestmark = pytest.mark.slow  # two whole studies (≈ 2 + 5 min on 2 shared cores); run it before landing a refactoring

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("STEPML_UPDATE_GOLDEN") == "1"
OUTPUTS = ("metrics.csv", "verdict.json", "replay.csv", "report.md")
SYNTH_RUNS = [
    "20260217-155451-llama-2-7b-tp1-codegen",
    "20260217-162547-llama-2-7b-tp1-roleplay",
    "20260218-150304-codellama-34b-tp2-general",
    "20260218-160939-codellama-34b-tp2-reasoning",
]
SYNTH_SCALE, SYNTH_SEED = 0.03, 3
# the two runs with step traces (assembled with their request logs) and two request-log-only runs
REAL_RUNS = [
    "20260217-203421-llama-2-70b-hf-tp4-codegen",
    "20260218-150304-codellama-34b-tp2-general",
    "20260218-084319-llama-2-70b-tp4-roleplay",
    "20260218-155500-codellama-34b-tp2-roleplay",
]


def _outputs(out: Path) -> dict[str, str]:
    """{file: text} of the study's outputs, the output folder's path replaced by <out>, and the measured
    figures replaced: the replay table's "× real time" (simulated seconds per wall second) by <speed>, the
    calibration's cost line ("Cost: n distinct calibrations in x s wall (... Σ y s ...)") by <s>."""
    texts = {}
    for name in OUTPUTS:
        p = out / name
        if p.is_file():
            texts[name] = p.read_text().replace(str(out.resolve()), "<out>").replace(str(out), "<out>")
    if "report.md" in texts:
        texts["report.md"] = _mask_seconds(_mask_speed(texts["report.md"]))
    return texts


def _mask_seconds(md: str) -> str:
    return "".join(
        re.sub(r"[0-9][0-9.]* s\b", "<s> s", line) if line.startswith("Cost: ") else line
        for line in md.splitlines(keepends=True)
    )


def _mask_speed(md: str) -> str:
    out, col = [], None
    for line in md.splitlines(keepends=True):
        cells = line.rstrip("\n").split("|")
        if len(cells) > 2 and cells[-2].strip() == "× real time":
            col = len(cells) - 2  # the header of the replay-speed table: its last cell
        elif col is not None and line.startswith("|") and len(cells) == col + 2:
            if set(cells[col].strip()) - set("-"):  # a row, not the |---| rule
                line = "|".join([*cells[:col], " <speed> ", *cells[col + 1 :]]) + "\n"
        else:
            col = None
        out.append(line)
    return "".join(out)


def _diff(name: str, want: str, got: str) -> str:
    lines = difflib.unified_diff(want.splitlines(), got.splitlines(), f"golden/{name}", f"now/{name}", lineterm="", n=1)
    return "\n".join(list(lines)[:80])


def _check(study: str, texts: dict[str, str], *, as_files: bool) -> None:
    folder = GOLDEN / study
    digests = {n: hashlib.sha256(t.encode()).hexdigest() for n, t in sorted(texts.items())}
    if UPDATE:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "sha256.json").write_text(json.dumps(digests, indent=1) + "\n")
        if as_files:
            for n, t in texts.items():
                (folder / n).write_text(t)
        pytest.skip(f"golden outputs of the {study} study written to {folder}")
    want = json.loads((folder / "sha256.json").read_text())
    assert sorted(digests) == sorted(want), f"{study}: outputs written {sorted(digests)}, expected {sorted(want)}"
    moved = [n for n in want if digests[n] != want[n]]
    if moved and as_files:
        raise AssertionError("\n\n".join(_diff(n, (folder / n).read_text(), texts[n]) for n in moved))
    assert not moved, f"{study}: outputs changed: {moved} (sha256 {[digests[n][:12] for n in moved]})"


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory) -> Path:
    data, out = tmp_path_factory.mktemp("synth_data"), tmp_path_factory.mktemp("synth_out")
    synthesize_runs(data, SYNTH_RUNS, scale=SYNTH_SCALE, seed=SYNTH_SEED, workers=1)
    res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    assert res["study_ok"] and not res["failed"], res["errors"]
    return out


@pytest.fixture(scope="module")
def real_study(real_experiments, tmp_path_factory) -> Path:
    from stepml_core.runs.real_data import assemble_real_runs

    data, out = tmp_path_factory.mktemp("real_data"), tmp_path_factory.mktemp("real_out")
    assemble_real_runs(real_experiments.parents[1], data, REAL_RUNS)
    res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    assert res["study_ok"] and not res["failed"], res["errors"]
    return out


def test_synthetic_study_outputs_unchanged(synthetic_study):
    texts = _outputs(synthetic_study)
    assert set(texts) == set(OUTPUTS)  # the synthetic runs carry request logs: replay.csv too
    _check("synthetic", texts, as_files=True)


def test_real_study_outputs_unchanged(real_study):
    texts = _outputs(real_study)
    assert set(texts) == set(OUTPUTS)
    _check("real", texts, as_files=False)


def test_a_changed_output_is_caught():
    """The comparison itself can fail: one changed figure in a copy of the golden metrics.csv."""
    if UPDATE:
        pytest.skip("writing golden outputs")
    folder = GOLDEN / "synthetic"
    texts = {n: (folder / n).read_text() for n in OUTPUTS}
    lines = texts["metrics.csv"].splitlines()
    lines[1] = lines[1][:-1] + ("1" if lines[1][-1] != "1" else "2")
    texts["metrics.csv"] = "\n".join(lines) + "\n"
    with pytest.raises(AssertionError, match="now/metrics.csv"):
        _check("synthetic", texts, as_files=True)
