import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))  # the project's developer tools (process_group, long_functions), for the tests
# ../shared/real (the two real H100 runs); STEPML_SHARED_REAL overrides it (e.g. to check that tests skip cleanly without it)
SHARED_REAL = Path(os.environ.get("STEPML_SHARED_REAL", str(REPO.parent / "shared" / "real")))
REAL_EXPERIMENTS = SHARED_REAL / "experiments"


@pytest.fixture(scope="session")
def real_experiments() -> Path:
    if not REAL_EXPERIMENTS.is_dir() or not any(REAL_EXPERIMENTS.iterdir()):
        pytest.skip(f"real H100 runs not available at {REAL_EXPERIMENTS}")
    return REAL_EXPERIMENTS


@pytest.fixture(autouse=True, scope="session")
def _isolated_dagster_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = old


# fixtures that read ../shared/real (and skip without it); a new one goes here (README counts the `real` tests)
REAL_DATA_FIXTURES = ("real_experiments", "real_runs", "real_request_study")


def pytest_collection_modifyitems(config, items):
    """Every test that uses the real runs (a REAL_DATA_FIXTURES fixture) carries the `real` marker:
    `pytest -m real` lists them, `pytest -m "not real"` leaves them out."""
    for item in items:
        if set(REAL_DATA_FIXTURES) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)
