"""`make bench-scale`: kubetune's data stages against the plain Hugging Face `datasets` script, at
several row counts, in one sitting on this machine; writes bench/results/scale.json and scale.md.

Why: platform teams bring production data (millions of rows). This measures how the data stages'
time and memory grow with the data, beside what a user would write instead
(bench/plain_datasets.py), against the goals in README's "Data at production size": memory flat in
the row count, cost linear, no slower than the plain script.

How: per size (default 10k, 100k, 1M, 3M rows; --sizes picks) a JSONL file of short English texts
(~110 bytes a row, streamed from Shakespeare and the quotes with a fixed seed) and, once, a tiny
GPT-2 (2 layers, hidden 64) with a byte-level BPE tokenizer trained on those texts, all offline.
Each side runs in a fresh process: kubetune's preflight data check, prepare_data, tokenize (reading
what prepare_data wrote), and the plain script. For each: the process's wall seconds (imports
included: each kubetune stage is its own pod in a pipeline), the seconds of the work itself, and
peak memory: the RSS of the process and of the process with all its descendants, sampled every
0.1 s (psutil), plus the kernel's ru_maxrss of the process as a cross-check (it counts from this
launcher's size at the start, tens of MB, so the launcher imports no ML library). MB = 10^6 bytes.

The data and the model are written into --work DIR (reused on a later run) or a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import itertools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

started = time.monotonic()

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED / "retention" / "tinyshakespeare_input.txt"
QUOTES = SHARED / "quotes" / "quotable_sample_quotes.json"

DEFAULT_SIZES = "10000,100000,1000000,3000000"
SEED = 42
MAX_LENGTH = 128
VOCAB_SIZE = 2000
TOKENIZER_TEXTS = 5000
EOS = "<|endoftext|>"
MB = 1e6
SAMPLE_SECONDS = 0.1
KUBETUNE_SIDES = ("preflight", "prepare_data", "tokenize")
SIDES = (*KUBETUNE_SIDES, "plain")

# The goals.
GOAL_PEAK_MB_AT_1M = 1500.0
GOAL_RSS_GROWTH_1M_TO_3M = 1.10
GOAL_SECONDS_VS_PLAIN_AT_1M = 1.0
GOAL_PER_ROW_GROWTH_100K_TO_1M = 1.2


# ---- data and model --------------------------------------------------------------------------------


def texts(seed: int) -> Iterator[str]:
    """Endless short English texts: runs of consecutive words from Shakespeare or the quotes, of a
    log-normal length in characters (median ~78, 12 to 600), so that a JSONL row averages ~110 bytes."""
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8").split()
    quotes = " ".join(row["content"] for row in json.loads(QUOTES.read_text(encoding="utf-8"))).split()
    rng = random.Random(seed)
    while True:
        words = shakespeare if rng.random() < 0.5 else quotes
        target = min(600.0, max(12.0, rng.lognormvariate(4.355, 0.6)))
        start = rng.randrange(len(words) - 200)
        picked, length = [], -1
        for word in words[start:start + 200]:
            picked.append(word)
            length += len(word) + 1
            if length >= target:
                break
        yield " ".join(picked)


def write_data(path: Path, rows: int) -> None:
    """Streams the rows to path (through a .partial file, so an interrupted run is not reused)."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for text in itertools.islice(texts(SEED), rows):
            handle.write(json.dumps({"text": text}) + "\n")
    partial.rename(path)


def build_model(folder: Path) -> None:
    """A tiny GPT-2 and a byte-level BPE tokenizer trained on the benchmark's texts, saved like a hub
    snapshot (through a .partial folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(itertools.islice(texts(SEED), TOKENIZER_TEXTS), trainer)
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    GPT2LMHeadModel(config).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(folder)


# ---- the kubetune sides (child processes) -------------------------------------------------------------


def run_config(data_path: str, model_dir: str) -> dict:
    """A causal_lm run on the tiny model, with the plain script's settings: 10% held out, seed 42,
    128 tokens. No retention text: the data check alone is measured."""
    return {"task": "causal_lm",
            "model": {"name_or_path": model_dir, "quantization": "none", "lora": None},
            "data": {"path": data_path, "text_field": "text", "validation_fraction": 0.1, "max_length": MAX_LENGTH},
            "train": {"max_steps": 2, "seed": SEED},
            "evaluate": {"retention_path": None},
            "register": {"model_name": "bench-scale"}}


def child(side: str, data_path: str, model_dir: str, prepared: str, out: str) -> None:
    """One kubetune stage; prints one line of JSON (seconds of the imports and of the work)."""
    from kubetune import artifacts, data, preflight, tokenization
    from kubetune.config import RunConfig

    if side == "tokenize":
        # What the stage imports on its first call, imported before the clock starts, as the plain
        # script's are: the work seconds of both sides then leave imports out alike.
        from datasets import Dataset  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401

    cfg = RunConfig.from_dict(run_config(data_path, model_dir))
    imported = time.monotonic()
    figures: dict = {}
    if side == "preflight":
        info, _ = preflight.check_data(cfg)
        figures = {"rows_train": info["train_rows"], "rows_validation": info["validation_rows"]}
    elif side == "prepare_data":
        # prepare_data writes its artifact itself once it takes out_dir; before that, the stage's
        # two calls (the rows in memory, then written) are the same work.
        if "out_dir" in inspect.signature(data.prepare_data).parameters:
            data.prepare_data(cfg.data, "causal_lm", cfg.train.seed, out_dir=Path(out))
            figures["call"] = "prepare_data(out_dir=...)"
        else:
            splits = data.prepare_data(cfg.data, "causal_lm", cfg.train.seed)
            artifacts.write_dataset(Path(out), splits.by_name(), splits.stats)
            figures["call"] = "prepare_data + artifacts.write_dataset"
    elif side == "tokenize":
        stats = tokenization.tokenize(Path(prepared), Path(model_dir), cfg.data, Path(out), "causal_lm")
        figures = {"tokens_train": stats.get("train_tokens_total")}
    else:
        raise SystemExit(f"unknown side {side}")
    done = time.monotonic()
    if side == "prepare_data":  # counted after the clock stops
        stats = json.loads((Path(out) / artifacts.DATA_STATS).read_text())
        figures.update(rows_train=stats["rows_train"], rows_validation=stats["rows_validation"])
    print(json.dumps({"import_seconds": round(imported - started, 3), "work_seconds": round(done - imported, 3),
                      **figures}))


# ---- measuring a side from outside ------------------------------------------------------------------------


class SideFailed(SystemExit):
    """A side's process failed; the message holds the end of its output."""


def proportional_anon(pid: int) -> int:
    """The process's anonymous memory in bytes, each page shared with other processes (a forked
    worker's copy-on-write pages) counted in proportion (Pss_Anon of /proc/PID/smaps_rollup): the
    sum over a process tree is the anonymous memory the tree holds. RSS also counts the pages of
    memory-mapped files (the Arrow data), which the kernel reclaims under a memory limit rather
    than kill the process, and counts a page shared by N workers N times."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], env: dict, logs: Path) -> dict:
    """Runs command, sampling the RSS of the process and of its whole process tree every 0.1 s;
    returns its JSON line with the wall seconds and the peaks added."""
    import psutil

    stdout, stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
    peaks = {"tree": 0, "main": 0, "anon": 0, "processes": 0}
    stop = threading.Event()

    def sample(pid: int) -> None:
        try:
            main = psutil.Process(pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                main_rss = main.memory_info().rss
                tree, anon = [main_rss], [proportional_anon(pid)]
                for process in main.children(recursive=True):
                    try:
                        tree.append(process.memory_info().rss)
                    except psutil.Error:  # a worker that ended between listing and reading
                        continue
                    anon.append(proportional_anon(process.pid))
            except psutil.Error:  # the process ended
                return
            peaks["main"] = max(peaks["main"], main_rss)
            peaks["tree"] = max(peaks["tree"], sum(tree))
            peaks["anon"] = max(peaks["anon"], sum(anon))
            peaks["processes"] = max(peaks["processes"], len(tree))
            stop.wait(SAMPLE_SECONDS)

    begun = time.monotonic()
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=ROOT)
    sampler = threading.Thread(target=sample, args=(process.pid,), daemon=True)
    sampler.start()
    # wait4 rather than Popen.wait: the kernel's peak RSS of the child comes with its exit status.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - begun
    process.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SideFailed(f"bench-scale: `{' '.join(command)}` failed (exit {process.returncode}):\n"
                         f"{stdout.read_text()[-2000:]}\n{stderr.read_text()[-4000:]}")
    lines = [line for line in stdout.read_text().splitlines() if line.strip()]
    return {"process_seconds": round(wall, 3), **json.loads(lines[-1]),
            "peak_rss_tree_mb": round(peaks["tree"] / MB, 1), "peak_rss_main_mb": round(peaks["main"] / MB, 1),
            "peak_pss_anon_tree_mb": round(peaks["anon"] / MB, 1),
            "ru_maxrss_mb": round(usage.ru_maxrss * 1024 / MB, 1),  # Linux reports KiB
            "max_processes": peaks["processes"]}


def child_env(tmp: Path) -> dict:
    return {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def measure_size(work: Path, rows: int, model_dir: Path) -> dict:
    data_path = work / f"data-{rows}.jsonl"
    if not data_path.exists():
        began = time.monotonic()
        write_data(data_path, rows)
        print(f"{rows} rows: wrote {data_path} in {time.monotonic() - began:.1f} s", flush=True)
    size_dir = work / f"rows-{rows}"
    shutil.rmtree(size_dir, ignore_errors=True)
    tmp = size_dir / "tmp"
    prepared, tokenized, plain_out = size_dir / "prepared", size_dir / "tokenized", size_dir / "plain"
    env = child_env(tmp)
    commands = {side: [sys.executable, str(Path(__file__).resolve()), "--child", side, str(data_path), str(model_dir),
                       str(prepared), str(tokenized if side == "tokenize" else prepared)]
                for side in KUBETUNE_SIDES}
    commands["plain"] = [sys.executable, str(ROOT / "bench" / "plain_datasets.py"), str(data_path), str(model_dir),
                         "--out", str(plain_out), "--max-length", str(MAX_LENGTH)]
    sides = {}
    for side in SIDES:  # in this order: tokenize reads what prepare_data wrote
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sides[side] = measure(commands[side], env, size_dir / side)
        sides[side].pop("out", None)  # the plain script's output folder, removed below
        print(f"{rows} rows, {side}: {json.dumps(sides[side])}", flush=True)
    shutil.rmtree(size_dir)  # the artifacts of 3M rows take GBs
    size_bytes = data_path.stat().st_size
    return {"data": {"rows": rows, "bytes": size_bytes, "bytes_per_row": round(size_bytes / rows, 1)},
            "sides": sides, "ratios": size_ratios(sides)}


# ---- ratios, goals, report ----------------------------------------------------------------------------


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 3) if a is not None and b else None


def kubetune_seconds(sides: dict, key: str = "process_seconds") -> float:
    return sides["prepare_data"][key] + sides["tokenize"][key]


def size_ratios(sides: dict) -> dict:
    plain = sides["plain"]
    ratios = {"prepare_tokenize_vs_plain_seconds": ratio(kubetune_seconds(sides), plain["process_seconds"]),
              "prepare_tokenize_vs_plain_work_seconds": ratio(kubetune_seconds(sides, "work_seconds"),
                                                              plain["work_seconds"])}
    for side in KUBETUNE_SIDES:
        ratios[f"{side}_vs_plain_peak_rss_tree"] = ratio(sides[side]["peak_rss_tree_mb"], plain["peak_rss_tree_mb"])
    return ratios


def peak_mb(sides: dict, key: str = "peak_rss_tree_mb") -> float:
    """The highest peak of kubetune's stages (process tree)."""
    return max(sides[side][key] for side in KUBETUNE_SIDES)


def cross_size(sizes: dict) -> tuple[dict, list[dict]]:
    """The ratios between sizes and the issue's goals (each pass, fail, or not measured)."""
    at = {int(rows): result for rows, result in sizes.items()}
    small, big, huge = at.get(100_000), at.get(1_000_000), at.get(3_000_000)
    ratios: dict = {}
    if small and big:
        # The work alone: the imports' fixed seconds would make 100k rows look dearer per row.
        ratios["per_row_work_seconds_1m_vs_100k"] = ratio(kubetune_seconds(big["sides"], "work_seconds") / 1_000_000,
                                                           kubetune_seconds(small["sides"], "work_seconds") / 100_000)
    if big and huge:
        for side in SIDES:
            ratios[f"{side}_peak_rss_3m_vs_1m"] = ratio(huge["sides"][side]["peak_rss_tree_mb"],
                                                        big["sides"][side]["peak_rss_tree_mb"])
        ratios["kubetune_peak_rss_3m_vs_1m"] = ratio(peak_mb(huge["sides"]), peak_mb(big["sides"]))
        ratios["kubetune_peak_anon_3m_vs_1m"] = ratio(peak_mb(huge["sides"], "peak_pss_anon_tree_mb"),
                                                      peak_mb(big["sides"], "peak_pss_anon_tree_mb"))

    def goal(name: str, value: Optional[float], limit: float) -> dict:
        status = "not measured" if value is None else "pass" if value <= limit else "fail"
        return {"goal": name, "value": value, "limit": limit, "status": status}

    goals = [goal("peak RSS of any kubetune stage at 1M rows, MB", peak_mb(big["sides"]) if big else None,
                  GOAL_PEAK_MB_AT_1M),
             goal("peak RSS of kubetune's stages at 3M / at 1M", ratios.get("kubetune_peak_rss_3m_vs_1m"),
                  GOAL_RSS_GROWTH_1M_TO_3M),
             goal("peak anonymous memory (Pss_Anon, tree) of any kubetune stage at 1M rows, MB",
                  peak_mb(big["sides"], "peak_pss_anon_tree_mb") if big else None, GOAL_PEAK_MB_AT_1M),
             goal("peak anonymous memory of kubetune's stages at 3M / at 1M", ratios.get("kubetune_peak_anon_3m_vs_1m"),
                  GOAL_RSS_GROWTH_1M_TO_3M),
             goal("prepare_data + tokenize process seconds / plain's at 1M rows",
                  big["ratios"]["prepare_tokenize_vs_plain_seconds"] if big else None, GOAL_SECONDS_VS_PLAIN_AT_1M),
             goal("prepare_data + tokenize work seconds per row, 1M / 100k",
                  ratios.get("per_row_work_seconds_1m_vs_100k"), GOAL_PER_ROW_GROWTH_100K_TO_1M)]
    return ratios, goals


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gb": round(psutil.virtual_memory().total / 1e9, 1), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Measured {report['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']} "
             f"(load average at start {m['load_average_at_start'][0]}); "
             + ", ".join(f"{name} {v}" for name, v in report["versions"].items()) + ".",
             "",
             "Each side is a fresh process. Seconds: the process's wall time (imports included) and the work "
             "alone. Peak RSS sampled every 0.1 s: the process tree (the process and its descendants) and the "
             "process alone; ru_maxrss is the kernel's figure for the process; anonymous: the tree's Pss_Anon (shared "
             "pages counted once; RSS also holds memory-mapped Arrow pages, which a memory limit reclaims). MB = 10^6 bytes.",
             "",
             "| rows | side | process s | work s | peak RSS tree MB | peak RSS main MB | ru_maxrss MB | anonymous MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for rows, result in report["sizes"].items():
        for side, f in result["sides"].items():
            lines.append(f"| {int(rows):,} | {side} | {f['process_seconds']:.2f} | {f['work_seconds']:.2f} | "
                         f"{f['peak_rss_tree_mb']:.0f} | {f['peak_rss_main_mb']:.0f} | {f['ru_maxrss_mb']:.0f} | "
                         f"{f.get('peak_pss_anon_tree_mb', 0):.0f} |")
    lines += ["", "| rows | ratio | value |", "|---:|---|---:|"]
    for rows, result in report["sizes"].items():
        lines += [f"| {int(rows):,} | `{key}` | {value} |" for key, value in result["ratios"].items()]
    lines += [f"| | `{key}` | {value} |" for key, value in report["ratios"].items()]
    lines += ["", "| goal | value | limit | status |", "|---|---:|---:|---|"]
    lines += [f"| {g['goal']} | {'-' if g['value'] is None else g['value']} | {g['limit']} | {g['status']} |"
              for g in report["goals"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict) -> None:
    report["ratios"], report["goals"] = cross_size(report["sizes"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(markdown(report))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:7])
        return
    if sys.argv[1:2] == ["--build-model"]:
        build_model(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"row counts, comma-separated (default {DEFAULT_SIZES})")
    parser.add_argument("--work", type=Path, help="folder for the data and the model, kept and reused "
                        "(default: a temporary folder, removed at the end)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as temporary:
        work = (args.work or Path(temporary)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model_dir = work / "tiny-gpt2"
        if not model_dir.exists():
            # In a process of its own: a child's ru_maxrss starts from this process's size when it
            # was started, so this one must never import transformers.
            built = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-model", str(model_dir)],
                                   env=child_env(work), capture_output=True, text=True)
            if built.returncode != 0:
                raise SideFailed(f"bench-scale: building the tiny model failed:\n{built.stderr[-4000:]}")
        report = {"date": datetime.date.today().isoformat(), "machine": machine(),
                  "versions": {name: version(name) for name in
                               ("kubetune", "datasets", "pyarrow", "tokenizers", "transformers")},
                  "settings": {"max_length": MAX_LENGTH, "validation_fraction": 0.1, "seed": SEED,
                               "vocab_size": VOCAB_SIZE, "model": "GPT-2, 2 layers, hidden 64",
                               "sample_seconds": SAMPLE_SECONDS},
                  "sizes": {}}
        for rows in sizes:
            report["sizes"][str(rows)] = measure_size(work, rows, model_dir)
            write_report(report)  # after every size, so a long run's finished sizes are kept
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_report(report)
    print(markdown(report))


if __name__ == "__main__":
    main()
