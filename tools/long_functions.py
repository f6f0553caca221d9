"""Functions longer than a limit (default 80 lines) in the project's own code, and whether a reason is written
above each: a comment line starting with `# long:` directly above the `def` (or above its decorators); and modules
longer than 600 lines, each with a line starting with `# long module:` (the reason) among its top-level lines.

    python tools/long_functions.py [--limit N]    lists them; exit 1 if one has no reason
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stepml_core", "stepml_dagster", "benchmarks", "tests", "tools", "scripts")
LIMIT = 80
REASON = "# long:"
MODULE_LIMIT = 600
MODULE_REASON = "# long module:"


def long_functions(root: Path = ROOT, limit: int = LIMIT) -> list[dict]:
    """[{file, line, name, lines, reason}] for every function or method over `limit` lines (def to last line)."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            text = path.read_text()
            src = text.splitlines()
            for node in ast.walk(ast.parse(text, filename=str(path))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                n = node.end_lineno - node.lineno + 1
                if n <= limit:
                    continue
                top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                above = src[top - 2].strip() if top >= 2 else ""
                out.append(
                    {
                        "file": str(path.relative_to(root)),
                        "line": node.lineno,
                        "name": node.name,
                        "lines": n,
                        "reason": above[len(REASON) :].strip() if above.startswith(REASON) else None,
                    }
                )
    return sorted(out, key=lambda f: -f["lines"])


def long_modules(root: Path = ROOT, limit: int = MODULE_LIMIT) -> list[dict]:
    """[{file, lines, reason}] for every module of the project's packages over ``limit`` lines."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            src = path.read_text().splitlines()
            if len(src) <= limit:
                continue
            reason = next((x[len(MODULE_REASON) :].strip() for x in src if x.startswith(MODULE_REASON)), None)
            out.append({"file": str(path.relative_to(root)), "lines": len(src), "reason": reason})
    return sorted(out, key=lambda f: -f["lines"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=LIMIT)
    a = ap.parse_args(argv)
    found = long_functions(limit=a.limit)
    for f in found:
        print(
            f"{f['lines']:5d}  {f['file']}:{f['line']}  {f['name']}  {'reason: ' + f['reason'] if f['reason'] else 'NO REASON'}"
        )
    missing = sum(1 for f in found if f["reason"] is None)
    print(f"{len(found)} function(s) over {a.limit} lines, {missing} without a reason")
    modules = long_modules()
    for m in modules:
        print(f"{m['lines']:5d}  {m['file']}  {'reason: ' + m['reason'] if m['reason'] else 'NO REASON'}")
    missing_m = sum(1 for m in modules if m["reason"] is None)
    print(f"{len(modules)} module(s) over {MODULE_LIMIT} lines, {missing_m} without a reason")
    return 1 if missing or missing_m else 0


if __name__ == "__main__":
    sys.exit(main())
