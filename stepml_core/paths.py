"""Locations of the project's own data files (catalogue, reference figures)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT / "data"
CATALOG_DIR = DATA_DIR / "catalog"
REFERENCE_DIR = DATA_DIR / "reference"
DEFAULT_EXPERIMENTS_DIR = DATA_DIR / "experiments"
