"""What an evaluation run is: everything that changes its results, as one nested record.

A run folder keeps its identity in `run.json`. Re-running the same command resumes it; a
command with another identity is refused, with the keys that differ named. The identity is

    editor      its full config (or, for an export, the export's config) and its weights' digest
    model       name, fingerprint (every weight, the prompt rendering, an enhancement in effect)
                and answers (that and the generation config, detokenisation, torch/transformers
                versions); `enhancement` (its setting) when the model is enhanced
    data        name, split, the digest of the selected records and of every clip they use,
                the instances and sequences selected, skip_missing_audio
    sweeps      which sweeps, the sequential window (first, max_gap)
    judge       the judge's settings that decide verdicts (model, prompt version, base_url, ...)
    generation  evaluation.sweep.Generation: max_new_tokens, batch_size, edits_per_batch (the
                K used: batched arithmetic may differ from K=1's in the last bits, so a folder
                never mixes two K)

`config_digest` is the part known before anything is loaded (the composed config's
result-relevant keys); the default run folder name carries it, so another setting never
resumes into the folder of the first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datamodules.audio_io import AudioResolver
from datamodules.schema import EditInstance
from lalms.enhancement import Enhancement

# Keys of the evaluation config whose values change results (evaluate.yaml); `editor` counts
# with its method and hparams only, `fabric` (how many processes) not at all.
CONFIG_KEYS = ("mode", "ckpt", "results", "runs", "model", "data", "judge", "sweeps", "sequential", "split",
               "max_new_tokens", "batch_size", "edits_per_batch", "accumulate")  # fmt: skip
# Data settings that only shape training batches.
TRAINING_ONLY = ("batch_size", "num_workers", "shuffle_buffer", "seed")
# Judge settings that decide how fast, not what: the connection's but its base_url, and the cache.
THROUGHPUT_ONLY = ("max_concurrency", "max_retries", "timeout_s", "api_key_env")


def digest(obj: Any, n: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`, its first `n` hex digits."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def result_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of an evaluate.py config that changes results."""
    out = {k: _plain(cfg.get(k)) for k in CONFIG_KEYS if k in cfg}
    editor = cfg.get("editor")
    if editor is None:
        out["editor"] = None
    elif "method" in editor:
        out["editor"] = {"method": editor.method, "hparams": _plain(editor.hparams)}
    else:  # editor=none: the unedited model
        out["editor"] = editor.name
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k not in TRAINING_ONLY}
    enhancement = Enhancement.from_config(cfg.get("enhancement"))
    if enhancement is not None:  # named only when set: the plain model's digests stay as they were
        out["enhancement"] = enhancement.as_dict()  # a file's content, not its name
    if isinstance(out.get("judge"), dict):
        judge = {k: v for k, v in out["judge"].items() if k != "cache_path"}
        if isinstance(judge.get("connection"), dict):
            judge["connection"] = {k: v for k, v in judge["connection"].items() if k not in THROUGHPUT_ONLY}
        out["judge"] = judge
    return out


def config_digest(cfg: DictConfig) -> str:
    return digest(result_config(cfg), 8)


def data_digest(instances: Iterable[EditInstance], resolver: AudioResolver) -> str:
    """A digest of the records (as written in the data files) and of the bytes of every clip
    they reference: rebuilt or re-encoded data is other data, whatever its name."""
    h = hashlib.sha256()
    files: set[tuple[str, str | None]] = set()
    for inst in instances:
        h.update(json.dumps(dict(inst.raw), sort_keys=True, ensure_ascii=False).encode())
        files.update((q.file, q.track) for q in inst.queries() if q.file)
    for file, track in sorted(files, key=lambda f: (f[1] or "", f[0])):
        path = resolver.find(file, track)
        h.update(f"{track}/{file}:".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest() if path is not None else b"missing")
    return h.hexdigest()[:16]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": 1} for {"a": {"b": 1}}; lists are values."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(before: Mapping[str, Any], now: Mapping[str, Any], show: int = 6) -> list[str]:
    """The flattened keys whose values differ, as "key: <there> there, <now> now"."""
    a, b = flatten(before), flatten(now)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    lines = [f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in keys[:show]]
    if len(keys) > show:
        lines.append(f"... and {len(keys) - show} more")
    return lines


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_identity(
    *,
    editor: Mapping[str, Any],
    model: Mapping[str, Any],
    data: Any,
    split: str,
    instances: Sequence[EditInstance],
    sequences: Sequence[Sequence[EditInstance]],
    sweeps: Mapping[str, Any],
    judge: Mapping[str, Any],
    generation: Mapping[str, Any],
) -> dict[str, Any]:
    """The identity of one evaluation run (see the module docstring); `data` a SakeDataModule."""
    used = [*instances, *(i for s in sequences for i in s)]
    return {
        "editor": dict(editor),
        "model": dict(model),
        "data": {
            "name": data.name,
            "split": split,
            "content": data_digest(used, data.resolver()),
            "selection": selection(instances, sequences),
            "skip_missing_audio": data.skip_missing_audio,
        },
        "sweeps": dict(sweeps),
        "judge": dict(judge),
        "generation": dict(generation),
    }


def selection(
    instances: Sequence[EditInstance], sequences: Sequence[Sequence[EditInstance]]
) -> dict[str, Any]:
    """Which instances a run evaluates: counts and a digest of their ids."""
    from evaluation.records import instance_id

    single = [instance_id(i) for i in instances]
    seq = [[instance_id(i) for i in s] for s in sequences]
    return {"single": len(single), "sequences": [len(s) for s in seq], "ids": digest([single, seq])}
