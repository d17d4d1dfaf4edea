"""`make bench`: kubetune's training against the script it replaces and the peer users would pick,
in one sitting on this machine, and the whole-run figures; writes bench/results/latest.json and
latest.md.

Sides (bench/sides.py, each a fresh process): kubetune's train stage, the guide's plain script and,
where the `bench` extra is installed, TRL's SFTTrainer padding to the longest and padding-free.
They run interleaved (the order rotates each round) so drift in the machine's speed spreads over
all of them; each figure is the median of the rounds, with the spread (min-max).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
QUOTES = ROOT.parent / "shared" / "data" / "quotes" / "quotable_sample_quotes.json"


def write_splits(work: Path) -> None:
    """kubetune's own split of the quotes (seed 42, 10% held out), as plain text records for every side."""
    from kubetune.config import DataConfig
    from kubetune.data import prepare_data

    splits = prepare_data(DataConfig(path=str(QUOTES), text_field="content"), "causal_lm", seed=42,
                          out_dir=work / "prepared")
    for name in ("train", "validation"):
        (work / f"{name}.json").write_text(json.dumps([{"text": row["text"]} for row in splits.rows(name)]))


class SideFailed(SystemExit):
    """A side's process failed; the message holds the end of its output. A SystemExit, so `make bench`
    stops with that message; bench/gpu.py catches it and goes on with the other sides."""


def run_side(side: str, work: Path, steps: int, options: Sequence[str] = ()) -> dict:
    """One side in a fresh process (bench/sides.py; options: its --model, --quantization, --max-length)."""
    out = work / f"{side}.json"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sides.py"), side, str(work), str(out), *options],
                          env={**os.environ, "BENCH_STEPS": str(steps)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SideFailed(f"bench side {' '.join([side, *options])} failed:\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "process_seconds": round(time.monotonic() - started, 2)}


def whole_run(steps: int) -> dict:
    """`kubetune run` on the demo config with retention off and the same steps, twice in one fresh
    state folder: the first run builds everything, the second reuses the tokenized data and the base
    model's figures. Timed from outside, as the plain script is: the whole process, preflight and
    imports included. The state folder's model snapshot is built beforehand (`kubetune check`), as
    the plain script's is: converting the GGUF package is a once-per-machine cost, not a run's."""
    from kubetune import tracking

    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-run-") as home:
        env = {**os.environ, "KUBETUNE_HOME": home}
        subprocess.run([sys.executable, "-m", "kubetune.cli", "check"], env=env, capture_output=True, cwd=ROOT,
                       check=True)
        for _ in range(2):
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", "--no-progress",
                                   "--set", f"train.max_steps={steps}", "--set", "evaluate.retention_path=null",
                                   # the plain script scores the held-out split only after training
                                   "--set", "train.eval_steps=0"],
                                  env=env, capture_output=True, text=True, cwd=ROOT)
            wall = round(time.monotonic() - started, 2)
            if done.returncode != 0:
                raise SystemExit(f"kubetune run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            client = tracking.client(f"sqlite:///{home}/mlflow.db")
            run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                     order_by=["attributes.start_time DESC"])[0]
            stages = tracking.stage_seconds(run.data.metrics)
            runs.append({"wall_seconds": wall, "stage_seconds": stages,
                         "base_reused": run.data.metrics.get("eval/base_reused", 0),
                         "tokens_reused": run.data.metrics.get("inputs/tokens_reused", 0)})
    return {"first": runs[0], "second": runs[1]}


def whole_run_ratios(whole: dict, plain_process_seconds: Optional[float]) -> dict:
    first, second = whole["first"], whole["second"]
    ratios = {"evaluate_vs_train": round(first["stage_seconds"]["evaluate"] / first["stage_seconds"]["train"], 3),
              "evaluate_vs_train_base_reused": round(second["stage_seconds"]["evaluate"] /
                                                     second["stage_seconds"]["train"], 3)}
    if plain_process_seconds:
        ratios["run_wall_vs_plain"] = round(first["wall_seconds"] / plain_process_seconds, 3)
        ratios["run_wall_vs_plain_second_run"] = round(second["wall_seconds"] / plain_process_seconds, 3)
    return ratios


def summary(results: list[dict]) -> dict:
    keys = ("tokens_per_s", "seconds_per_step", "padding_share", "heldout_perplexity", "process_seconds")
    return {key: {"median": statistics.median(r[key] for r in results), "min": min(r[key] for r in results),
                  "max": max(r[key] for r in results)} for key in keys}


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} on {report['machine']}; {report['steps']} steps, {report['rounds']} "
             "interleaved rounds, medians (min-max).", "",
             "| side | s/step | non-pad tokens/s | padding | held-out ppl |", "|---|---|---|---|---|"]
    for side, figures in report["sides"].items():
        def cell(key, fmt):
            f = figures[key]
            return f"{f['median']:{fmt}} ({f['min']:{fmt}}-{f['max']:{fmt}})"
        lines.append(f"| {side} | {cell('seconds_per_step', '.2f')} | {cell('tokens_per_s', '.1f')} | "
                     f"{figures['padding_share']['median']:.1%} | {cell('heldout_perplexity', '.2f')} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| `{key}` | {value} |" for key, value in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sides", default="kubetune,plain,trl,trl-padfree")
    parser.add_argument("--no-whole-run", action="store_true")
    parser.add_argument("--only-whole-run", action="store_true",
                        help="measure only the whole runs and update them in the latest results")
    args = parser.parse_args()
    if args.only_whole_run:
        report = json.loads((RESULTS / "latest.json").read_text())
        report["whole_run"] = whole_run(report["steps"])
        plain = report["sides"].get("plain", {}).get("process_seconds", {}).get("median")
        report["ratios"] = {k: v for k, v in report["ratios"].items()
                            if k not in ("evaluate_vs_train", "run_wall_vs_plain")}
        report["ratios"].update(whole_run_ratios(report["whole_run"], plain))
        report["whole_run_date"] = datetime.date.today().isoformat()
        (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "latest.md").write_text(markdown(report))
        print(markdown(report))
        return
    sides = [s for s in args.sides.split(",") if not s.startswith("trl") or importlib.util.find_spec("trl")]
    if sides[:1] != ["kubetune"]:
        parser.error("--sides must start with kubetune: every ratio is kubetune's figure over another side's")
    with tempfile.TemporaryDirectory(prefix="bench-") as work_dir:
        work = Path(work_dir)
        write_splits(work)
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for round_index in range(args.rounds):
            order = sides[round_index % len(sides):] + sides[:round_index % len(sides)]
            for side in order:
                result = run_side(side, work, args.steps)
                results[side].append(result)
                print(f"round {round_index + 1} {side}: {json.dumps(result)}", flush=True)
    report = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "steps": args.steps, "rounds": args.rounds, "sides": {s: summary(r) for s, r in results.items()},
              "runs": results}
    k = report["sides"]["kubetune"]
    ratios = {"padding_share": k["padding_share"]["median"],
              "heldout_perplexity_kubetune": k["heldout_perplexity"]["median"]}
    for side in sides[1:]:
        ratios[f"heldout_perplexity_{side}"] = report["sides"][side]["heldout_perplexity"]["median"]
    if "plain" in sides:
        ratios["train_tokens_per_s_vs_plain"] = round(
            k["tokens_per_s"]["median"] / report["sides"]["plain"]["tokens_per_s"]["median"], 3)
    peer = "trl-padfree" if "trl-padfree" in sides else "trl" if "trl" in sides else None
    if peer:
        ratios["train_tokens_per_s_vs_trl"] = round(
            k["tokens_per_s"]["median"] / report["sides"][peer]["tokens_per_s"]["median"], 3)
    if not args.no_whole_run:
        report["whole_run"] = whole_run(args.steps)
        plain = report["sides"].get("plain", {}).get("process_seconds", {}).get("median")
        ratios.update(whole_run_ratios(report["whole_run"], plain))
    report["ratios"] = ratios
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
