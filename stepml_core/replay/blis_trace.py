"""A run's workload as BLIS's replay input, and the ``blis run`` command that replays it (docs/replay.md, *BLIS*).

BLIS (../shared/reference/blis-stepml-format.md §2) replays a legacy trace CSV: a header, then per request
``arrival_time_s,request_id,model,"[input token ids]","[output token ids]"``. It decides prefix-cache hits from
the token IDs alone (16-token blocks, each block's hash over every token up to its end), so the trace has to carry
the prompt identity StepML's replay imputed (:func:`stepml_core.replay.simulate.replay_workload`):

* same ``group`` ⇒ the first ``nshared_blk`` × 16 prompt tokens are the same (the group's system prompt): every one
  of them is the token ``1 + group``;
* same ``prompt_id`` ⇒ the same prompt (same length, same group): its tokens after the shared part are all
  ``1 + groups + prompt_id``;
* output tokens are the request's own, ``1 + groups + prompts + row``, so no two requests share an output block;
* a prompt of a whole number of blocks ends with one block of the request's own token: StepML's cache (like vLLM's)
  hits at most prompt − 1 tokens, so that block is always computed; BLIS would hit it (a one-request probe shows
  BLIS computing 0 tokens of a fully cached 992-token prompt). Not for a prompt no longer than the shared system
  prompt (its blocks are the group's, which longer prompts hit): there BLIS hits one block more than StepML when
  the whole prompt is cached (no such prompt in the 16 real runs: their prompts are 4–8× the system prompt).

A block's hash covers every token before it, so two prompts share exactly the blocks StepML's prefix cache shares
(``stepml_core.sim.request.SimRequest.key``): the group's blocks, then, for the same prompt, its own full blocks.

The arrival is the request's µs from the first request, written as the shortest decimal whose float BLIS turns
back into the same µs (BLIS reads ``int64(x · 1e6)``, which truncates).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLIS_BLOCK_TOKENS = 16
TRACE_HEADER = "arrival_time,request_id,model,prefill_tokens,decode_tokens\n"
BLIS_ENV = "STEPML_BLIS"  # a BLIS binary to use instead of ../shared/tools/blis/blis (tests, benchmarks, report)


def arrival_text(arrival_us: np.ndarray) -> list[str]:
    """Seconds as text that BLIS reads back as the same integer µs: repr(us / 1e6), moved up one float where
    ``int64(x · 1e6)`` would truncate to us − 1."""
    us = np.asarray(arrival_us, dtype=np.int64)
    x = us.astype(np.float64) / 1e6
    low = np.trunc(x * 1e6) < us
    while low.any():
        x[low] = np.nextafter(x[low], np.inf)
        low = np.trunc(x * 1e6) < us
    return [repr(v) for v in x.tolist()]


def _repeat(token: int, n: int) -> str:
    return (f"{token}, " * n)[:-2] if n > 0 else ""


def _join(a: str, b: str) -> str:
    return f"{a}, {b}" if a and b else a or b


def write_blis_trace(w, path: Path, *, model: str) -> Path:
    """The workload ``w`` (replay.simulate.ReplayWorkload) as BLIS's legacy trace CSV at ``path``, one row per
    request in the workload's order (arrival, then index); streamed row by row, a prompt's token list built once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(w.prompt_tokens.size)
    groups = int(w.group.max()) + 1 if n else 1
    prompts = int(w.prompt_id.max()) + 1 if n else 1
    shared_tokens = int(w.nshared_blk) * BLIS_BLOCK_TOKENS
    arrival_us = np.rint(np.asarray(w.arrival_s, dtype=np.float64) * 1e6).astype(np.int64)
    arrivals = arrival_text(arrival_us)
    pid, grp = w.prompt_id.tolist(), w.group.tolist()
    plen, gen, idx = w.prompt_tokens.tolist(), w.max_tokens.tolist(), w.index.tolist()
    out_base = 1 + groups + prompts
    prompt_text: dict[int, str] = {}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", buffering=1 << 22) as f:
        f.write(TRACE_HEADER)
        for i in range(n):
            p, L = pid[i], plen[i]
            # an aligned prompt's last block is the request's own (not a prompt inside the system prompt: the group's)
            own_block = L % BLIS_BLOCK_TOKENS == 0 and L > shared_tokens
            text = prompt_text.get(p)
            if text is None:
                head = L - BLIS_BLOCK_TOKENS if own_block else L
                shared = min(shared_tokens, head)
                text = _join(_repeat(1 + grp[i], shared), _repeat(1 + groups + p, head - shared))
                prompt_text[p] = text
            own = out_base + i
            text_i = _join(text, _repeat(own, BLIS_BLOCK_TOKENS)) if own_block else text
            f.write(f'{arrivals[i]},request_{idx[i]},{model},"[{text_i}]","[{_repeat(own, gen[i])}]"\n')
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class BlisRun:
    """One run's ``blis run``: the LLM model, the serving limits of the replay (SchedulerConfig) and the files."""

    experiment_id: str
    model: str
    tp: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_blocks_total: int
    max_model_len: int
    trace: str  # file names, relative to the run's folder
    model_file: str
    results: str = "results.json"

    def args(self, blis: str = "blis") -> list[str]:
        """The command line, files relative to the run's folder."""
        return [
            blis,
            "run",
            "--model",
            self.model,
            "--tp",
            str(self.tp),
            "--workload",
            "traces",
            "--workload-traces-filepath",
            self.trace,
            "--max-num-running-reqs",
            str(self.max_num_seqs),
            "--max-num-scheduled-tokens",
            str(self.max_num_batched_tokens),
            "--total-kv-blocks",
            str(self.kv_blocks_total),
            "--block-size-in-tokens",
            str(BLIS_BLOCK_TOKENS),
            "--max-model-len",
            str(self.max_model_len),
            "--stepml-model",
            self.model_file,
            "--results-path",
            self.results,
            "--log",
            "error",
        ]

    def command(self) -> str:
        """The command as a shell line (what the manifest and the script hold), the binary ``${BLIS:-blis}``."""
        return '"${BLIS:-blis}" ' + shlex.join(self.args()[1:])

    def script(self) -> str:
        """An executable script: run BLIS from the script's folder, results beside it."""
        return (
            "#!/bin/sh\n"
            f"# BLIS replay of {self.experiment_id} with the exported {self.model} step model (stepml export).\n"
            "# BLIS=/path/to/blis overrides the binary; results go to "
            f"{self.results} beside this script.\n"
            'cd "$(dirname "$0")" || exit 1\n'
            f"exec {self.command()}\n"
        )


def blis_run_of(w, ctx, *, model: str, trace: str, model_file: str) -> BlisRun:
    """The BlisRun of a workload (its SchedulerConfig) and run context: max_model_len is the run's, else what the
    KV cache holds (BLIS's own default, 2,048, would refuse longer requests StepML serves)."""
    cfg = w.config
    mml = int(cfg.max_model_len) if cfg.max_model_len else int(cfg.kv_blocks_total) * BLIS_BLOCK_TOKENS
    return BlisRun(
        experiment_id=w.experiment_id,
        model=model,
        tp=int(ctx.tp),
        max_num_seqs=int(cfg.max_num_seqs),
        max_num_batched_tokens=int(cfg.max_num_batched_tokens),
        kv_blocks_total=int(cfg.kv_blocks_total),
        max_model_len=mml,
        trace=trace,
        model_file=model_file,
    )


def write_run_bundle(w, ctx, folder: Path, *, model: str, model_file: str) -> tuple[BlisRun, list[Path]]:
    """folder/trace.csv and folder/run_blis.sh for one run (model_file relative to folder); (BlisRun, paths)."""
    folder = Path(folder)
    br = blis_run_of(w, ctx, model=model, trace="trace.csv", model_file=model_file)
    trace = write_blis_trace(w, folder / br.trace, model=model)
    script = folder / "run_blis.sh"
    script.write_text(br.script())
    script.chmod(0o755)
    return br, [trace, script]


# ---------------------------------------------------------------------------- finding and running BLIS


def find_blis(project_root: Path) -> tuple[Path | None, str]:
    """(the BLIS binary, '') from $STEPML_BLIS, else ../shared/tools/blis/blis beside the project, else `blis` on
    PATH; (None, why not) when none is there."""
    given = os.environ.get(BLIS_ENV)
    if given == "auto":  # the discovery below, as when unset
        given = None
    if given == "off":
        return None, f"${BLIS_ENV}=off"
    cands = [Path(given)] if given else [Path(project_root).parent / "shared" / "tools" / "blis" / "blis"]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c.resolve(), ""
    on_path = None if given else shutil.which("blis")
    if on_path:
        return Path(on_path), ""
    where = f"${BLIS_ENV}={given}" if given else f"{cands[0]} (or ${BLIS_ENV}, or `blis` on PATH)"
    return None, f"no executable BLIS binary at {where}"


def study_blis(project_root: Path) -> tuple[Path | None, str, bool]:
    """For `stepml run`'s blis_round_trip, which is opt-in (writing every run's trace and running BLIS costs minutes
    and hundreds of MB on full-size runs): (binary, why not, asked). $STEPML_BLIS unset or ``off``: not asked;
    ``auto`` (what `stepml run --blis` sets): find_blis's discovery; a path: that binary."""
    given = os.environ.get(BLIS_ENV)
    if not given or given == "off":
        return (
            None,
            "BLIS round trip not run in this study (opt-in: `stepml run --blis [PATH]` or "
            f"${BLIS_ENV}=auto|PATH writes each run's BLIS trace and command under OUT/blis and runs them in BLIS; "
            "`stepml export --format blis` writes the same files on request)",
            False,
        )
    blis, why = find_blis(project_root)
    return blis, why, True


def run_bundle(script: Path, blis: Path, *, timeout_s: float = 900.0) -> dict:
    """Run a run's script (what a user runs) with BLIS=blis; BLIS's results JSON. A failed run raises
    RuntimeError with BLIS's last stderr line."""
    import json

    script = Path(script)
    env = {**os.environ, "BLIS": str(blis)}
    p = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=timeout_s)
    results = script.parent / "results.json"
    if p.returncode != 0 or not results.is_file():
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{script}: BLIS exited {p.returncode}: {tail[0]}")
    return json.loads(results.read_text())


def mean_ms(results: dict, name: str) -> float:
    """A mean from BLIS's results (``ttft_mean_ms``, ``e2e_mean_ms``), NaN where absent."""
    v = results.get(name)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")
