"""A disk cache of prepared (tokenised, masked, packed) data, so a second run skips tokenisation.

    key = cache_key(cfg, tokenizer, seed)       # None when the inputs cannot be fingerprinted
    data = load(key) or store(key, prepare(...))

The key covers everything the prepared rows depend on: the data files' contents (hashed), the
tokenizer (its serialised vocabulary, merges, special tokens and chat template), every data setting,
the seed, and the code that builds the rows: the source of the modules that tokenise, mask and pack
(CODE_FILES) and the versions of transformers and tokenizers, so a fix to the labels is never hidden
behind rows cached before it. Hub data sets are not cached here (`datasets` keeps its own download
cache and a hub revision is not a file to hash). Entries live under $LITE_SFT_HOME/cache/data
(LITE_SFT_HOME defaults to ~/.cache/lite-sft) and are written atomically, so a killed run never
leaves a half-written entry behind; an entry that cannot be read, or that other code wrote, is
rebuilt with a warning naming it and why.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pickle
from importlib import resources
from pathlib import Path

from lite_sft import __version__
from lite_sft.config import BUILTIN_DATA, DataConfig, lite_sft_home

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# The modules whose source decides the prepared rows, relative to lite_sft/tasks/: loading and formats,
# tokenising and masking, packing, this cache itself, and the validation-split rule.
CODE_FILES = ("causal_lm/data.py", "causal_lm/masking.py", "causal_lm/packing.py", "causal_lm/cache.py", "split.py")
TASKS_FOLDER = Path(__file__).parent.parent


def cache_dir() -> Path:
    return lite_sft_home() / "cache" / "data"


def cache_key(cfg: DataConfig, tokenizer, seed: int) -> str | None:
    digest = hashlib.sha256()
    for path in (cfg.path, cfg.validation_path):
        if path is None:
            continue
        fingerprint = _source_fingerprint(path)
        if fingerprint is None:
            return None
        digest.update(fingerprint)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer has no complete serialised form to hash
        return None
    digest.update(backend.to_str().encode())
    digest.update(code_digest())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map,
                              tokenizer.padding_side, dataclasses.asdict(cfg), seed, __version__, FORMAT_VERSION],
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


@functools.cache
def code_digest() -> bytes:
    """A digest of the code that builds the rows: CODE_FILES' source, and the tokenizer libraries' versions."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}".encode())
    digest.update(source_digest(TASKS_FOLDER))
    return digest.digest()


def source_digest(package: Path) -> bytes:
    """A digest of CODE_FILES in the folder `package` (lite_sft/tasks/, or a copy of it)."""
    digest = hashlib.sha256()
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + hashlib.sha256(package.joinpath(name).read_bytes()).digest())
    return digest.digest()


def load(key: str | None):
    """The cached PreparedData for `key`, or None: no key, no entry, or an entry that must be rebuilt (a
    warning says which and why)."""
    if key is None:
        return None
    path = cache_dir() / f"{key}.pkl"
    try:
        with path.open("rb") as f:
            entry = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as err:  # truncated, overwritten, or naming classes this code no longer has
        log.warning("data cache: rebuilding %s: it cannot be read (%s: %s); it is damaged, or other code wrote it",
                    path, type(err).__name__, err)
        return None
    if not (isinstance(entry, dict) and entry.get("code") == code_digest() and "data" in entry):
        log.warning("data cache: rebuilding %s: other lite-sft code wrote it (its code digest differs)", path)
        return None
    return entry["data"]


def store(key: str | None, data):
    if key is not None:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        with tmp.open("wb") as f:
            # The entry names the code that wrote it and load() checks that, so no entry is trusted for
            # where it sits alone: the file name is a truncated hash of many inputs.
            pickle.dump({"code": code_digest(), "data": data}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, folder / f"{key}.pkl")
    return data


def _source_fingerprint(path: str) -> bytes | None:
    """A digest of a data file's (or a saved data set folder's) bytes; None for a hub id."""
    if path == BUILTIN_DATA:
        files = [resources.files("lite_sft.assets") / n for n in ("skill_train.jsonl", "skill_eval.jsonl")]
        return b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)
    p = Path(path).expanduser()
    if p.is_file():
        return _file_digest(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return b"".join(str(f.relative_to(p)).encode() + _file_digest(f) for f in files)
    return None


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()
