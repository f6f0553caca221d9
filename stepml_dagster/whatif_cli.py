"""`stepml whatif`: capacity answers from a study's calibrated model for a described workload (stepml_core.whatif).

  stepml whatif --study OUT --model llama-2-70b --rates 2,4,8,16 --out DIR [--slo 'ttft_p99<2s,e2e_p99<30s']
                [--max-num-seqs 64,128] [--max-num-batched-tokens 1024,2048] [--tps 2,4,8] [--seed N] [--duration-s S]
                [--profile PROFILE.yaml] [--prompt-tokens N] [--output-tokens N] [--system-prompt-tokens N]
                [--groups N] [--prompts-per-group N]

The model is the one `stepml export` ships for --model (its parameter draws give the interval); the profile and the
serving limits default to that model's run with the most requests in the study, the template tokens (prompt tokens
beyond system + question) to the mean over its runs. Writes DIR/whatif.csv, DIR/whatif.json, DIR/whatif.png.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from stepml_core.paths import DEFAULT_EXPERIMENTS_DIR, PROJECT_ROOT


def _numbers(kind):
    def parse(text: str) -> list:
        try:
            vals = [kind(x) for x in str(text).split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of {kind.__name__} values") from None
        if not vals or any(v <= 0 for v in vals):
            raise argparse.ArgumentTypeError(f"{text!r}: give positive values, e.g. 2,4,8,16")
        return vals

    return parse


def add_parser(sub, parents=()) -> None:
    w = sub.add_parser(
        "whatif",
        parents=list(parents),
        help="sweep rate / max_num_seqs / max_num_batched_tokens with a study's calibrated model (SLO, saturation)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("--study", type=Path, default=PROJECT_ROOT / "out", help="a `stepml run` output folder")
    w.add_argument("--model", required=True, help="LLM model (catalogue key, e.g. llama-2-70b)")
    w.add_argument("--out", type=Path, required=True, help="folder for whatif.csv, whatif.json, whatif.png")
    rates = w.add_mutually_exclusive_group()
    rates.add_argument("--rates", type=_numbers(float), help="offered rates to sweep, req/s (e.g. 2,4,8,16)")
    rates.add_argument("--rate", type=_numbers(float), help="one offered rate, req/s")
    w.add_argument("--max-num-seqs", type=_numbers(int), help="max_num_seqs values to sweep (default: the run's)")
    w.add_argument("--max-num-batched-tokens", type=_numbers(int), help="max_num_batched_tokens values to sweep")
    w.add_argument(
        "--tps", type=_numbers(int), help="tensor-parallel degrees to sweep (default: the run's; others carried over)"
    )
    w.add_argument("--slo", help="e.g. 'ttft_p99<2s,e2e_p99<30s' (metrics of replay.csv; s or ms)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--duration-s", type=float, help="seconds of load per point (default: the profile's longest stage)")
    w.add_argument("--profile", type=Path, help="an inference-perf profile (YAML) instead of the model's run's")
    w.add_argument("--prompt-tokens", type=int, help="prompt tokens per request (system + question, no template)")
    w.add_argument("--output-tokens", type=int, help="generated tokens per request")
    w.add_argument("--system-prompt-tokens", type=int, help="shared system prompt tokens per group")
    w.add_argument("--groups", type=int, help="shared-prefix groups")
    w.add_argument("--prompts-per-group", type=int, help="distinct prompts per group")
    w.add_argument("--data", type=Path, default=DEFAULT_EXPERIMENTS_DIR, help="the study's data folder (old stores)")
    w.add_argument("--workers", type=int, default=None, help="points in parallel (default: min(2, cores))")


def study_runs(study: Path, data_root: Path) -> list:
    """The study's runs from its stored request logs (pipeline.whatif_runs)."""
    from stepml_core import pipeline

    from .export_cli import _stored

    folder = study / "assets" / "request_log"
    logs = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.is_dir() and not p.name.startswith("."):
            logs[p.name] = _stored(p, f"request_log of {p.name}", True)
    return pipeline.whatif_runs(logs, data_root)


def described(a: argparse.Namespace, desc):
    """The description after the flags: a --profile file replaces the run's profile, each flag one field."""
    from stepml_core.errors import UsageError
    from stepml_core.runs.folders import safe_load_yaml
    from stepml_core.whatif.workload import WorkloadDescription

    if a.profile is not None:
        if not a.profile.is_file():
            raise UsageError(f"--profile {a.profile}: no such file")
        desc = WorkloadDescription.from_profile(safe_load_yaml(a.profile), template_tokens=desc.template_tokens)
    changes = {}
    if a.system_prompt_tokens is not None:
        changes["system_prompt_tokens"] = a.system_prompt_tokens
    if a.prompt_tokens is not None:
        sys_tokens = changes.get("system_prompt_tokens", desc.system_prompt_tokens)
        if a.prompt_tokens <= sys_tokens:
            raise UsageError(f"--prompt-tokens {a.prompt_tokens}: must exceed the system prompt's {sys_tokens} tokens")
        changes["question_tokens"] = a.prompt_tokens - sys_tokens
        changes["template_tokens"] = 0.0
    for flag, field in (
        ("output_tokens", "output_tokens"),
        ("groups", "num_groups"),
        ("prompts_per_group", "prompts_per_group"),
    ):
        if getattr(a, flag) is not None:
            changes[field] = getattr(a, flag)
    return replace(desc, **changes) if changes else desc


def run(a: argparse.Namespace) -> int:
    from stepml_core.progress import make_progress
    from stepml_core.whatif.run import run_whatif
    from stepml_core.whatif.slo import parse_slo
    from stepml_core.whatif.study import choose_model, model_defaults

    from .export_cli import _load_study

    if a.slo:
        parse_slo(a.slo)  # refused before anything runs
    rows, specs, shipped, llm_of, per_llm, saturated = _load_study(Path(a.study))
    spec, info = choose_model(a.model, rows, specs, shipped, llm_of, per_llm, saturated)
    desc, limits, from_run = model_defaults(a.model, study_runs(Path(a.study), Path(a.data)))
    desc = described(a, desc)
    rates = a.rates or a.rate
    res = run_whatif(
        spec,
        info,
        desc,
        limits,
        a.out,
        rates=rates,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        tps=a.tps,
        slo=a.slo,
        seed=a.seed,
        duration_s=a.duration_s,
        workers=a.workers if a.workers is not None else min(2, os.cpu_count() or 1),
        progress_factory=make_progress,
        defaults_from=from_run,
    )
    print(
        f"{a.model}: {info['step_model']} (fitted on {len(info['fitted_on'] or [])} run(s), {info['draws']} "
        f"parameter draws); profile and limits of {from_run}"
    )
    for s in res["summary"]:
        print(
            f"  TP {s['tp']}, max_num_seqs {s['max_num_seqs']}, max_num_batched_tokens {s['max_num_batched_tokens']}: {summary_line(s)}"
        )
    print(f"wrote {', '.join(p.name for p in res['paths'])} under {a.out} ({res['seconds']:.1f} s)")
    return 0


def summary_line(s: dict) -> str:
    """One line of a sweep's summary (stepml_core.whatif.sweep.summarize)."""
    top = max(s["rates_rps"]) if s["rates_rps"] else None
    if s["saturation_rate_rps"] is None:
        sat = f"not saturated up to {top:g} req/s"
    else:
        sat = f"saturated from {s['saturation_rate_rps']:g} req/s"
    lo, hi = s["saturation_rate_lo_rps"], s["saturation_rate_hi_rps"]
    if (lo, hi) != (s["saturation_rate_rps"],) * 2:
        sat += f" (bound models: the slower saturated from {_rate(lo)}, the faster from {_rate(hi)})"
    out = sat + f"; max throughput {s['max_throughput_rps']:.3g} req/s"
    if "slo" in s:
        out += (
            f"; largest rate meeting {s['slo']}: {_rate(s['largest_rate_meeting_slo_rps'])} "
            f"(at the interval's bounds: {_rate(s['largest_rate_meeting_slo_at_bounds_rps'])})"
        )
    return out


def _rate(r) -> str:
    return "none swept" if r is None else f"{r:g} req/s"
