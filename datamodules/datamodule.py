"""A Lightning DataModule streaming SAKE-format JSON through HF `datasets`.

Records stream from the JSON files (round-robin over the attribute files, each record exactly
once), are shuffled through a buffer, split across DDP ranks without overlap or loss, and are
parsed and their audio decoded lazily in the DataLoader workers. Batches are lists of
`EditExample`s; the LightningModule hands their prompts to the LALM adapter.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import signal
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import torch
import yaml
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from datamodules.audio_io import AudioResolver
from datamodules.availability import (
    MissingAudio,
    MissingAudioError,
    drop_missing,
    find_missing,
    without_missing,
)
from datamodules.examples import EditExample, PromptBatches, to_example
from datamodules.loader import (
    SEQ_FILE,
    TEST_DIR,
    TRAIN_DIR,
    VAL_FILE,
    SakeData,
    data_root,
    edit_key,
    train_files,
    validation_keys,
)
from datamodules.mini.build import ensure_mini
from datamodules.pool import SakeTrainPool
from datamodules.resume import ResumableBatches
from datamodules.schema import ATTRIBUTES, EditInstance, parse_instance

log = logging.getLogger(__name__)
TAGS = ("_source", "_index", "_attribute")


def _tag(record: dict, index: int, source: str, attribute: str | None) -> dict:
    return {"_source": source, "_index": index, "_attribute": attribute}


def record_stream(files: list[tuple[Path, str | None]]) -> datasets.IterableDataset:
    """Records of several SAKE JSON files, interleaved, each tagged with its file and index."""
    parts = [
        datasets.load_dataset("json", data_files=str(path), split="train", streaming=True).map(
            partial(_tag, source=str(path), attribute=attr), with_indices=True
        )
        for path, attr in files
    ]
    if len(parts) == 1:
        return parts[0]
    return datasets.interleave_datasets(parts, stopping_strategy="all_exhausted_without_replacement")


def shard(stream: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """This rank's part: every record lands on exactly one rank."""
    return stream if world_size == 1 else split_dataset_by_node(stream, rank=rank, world_size=world_size)


class DecodedStream(torch.utils.data.IterableDataset):
    """Parses and decodes the records of a (sharded) stream; pads to `length` if given.

    Padding repeats this rank's first records so every DDP rank runs the same number of
    steps (as torch's DistributedSampler does); at most world_size - 1 records repeat.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        resolver: AudioResolver,
        rate: int,
        length: int | None,
        missing: MissingAudio | None = None,
    ):
        self.stream, self.resolver, self.rate, self.length = stream, resolver, rate, length
        self.missing = missing  # clips to leave out (data.skip_missing_audio)
        self.skip = 0  # records to pass over undecoded: a resumed run's already-trained part

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def decode(self, raw: dict[str, Any]) -> EditExample:
        record = {k: v for k, v in raw.items() if k not in TAGS}
        inst = parse_instance(record, raw["_source"], raw["_index"], raw["_attribute"])
        if self.missing is not None and self.missing.files:
            inst = without_missing(inst, self.missing)  # the stream holds no edit whose clip is missing
        return to_example(inst, self.resolver, self.rate)

    def __iter__(self) -> Iterator[EditExample]:
        return self._examples(self.skip)  # `skip` is read now, not at the first next()

    def _examples(self, skip: int) -> Iterator[EditExample]:
        first: list[dict[str, Any]] = []
        n = 0
        for raw in self.stream:
            if len(first) < 8:
                first.append(raw)
            n += 1
            if n > skip:
                yield self.decode(raw)
        if self.length is not None and n < self.length:
            if not first:
                raise ValueError(
                    f"this rank's share of the data is empty but must give {self.length} records: the "
                    "split has fewer records than there are ranks (use fewer devices or more data)"
                )
            for i in range(self.length - n):
                if n + i + 1 > skip:
                    yield self.decode(first[i % len(first)])


class SakeDataModule(PromptBatches, ResumableBatches, L.LightningDataModule):
    """Train and validation batches of `EditExample`s from a SAKE-format dataset.

    `root` holds the SAKE layout (root/train/... or root/data/train/...); `audio_root` the audio
    (default: root/audio). With `build_mini=True` a missing root is built as SAKE-mini first.

    Resumable mid-epoch (datamodules/resume.py): a resumed run's loader passes over the records
    already trained on without decoding them.
    """

    def __init__(
        self,
        root: str,
        audio_root: str | None = None,
        name: str = "sake",
        build_mini: bool = False,
        mini_seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 1,
        sampling_rate: int = 16000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_instances: int | None = None,
        skip_missing_audio: bool = False,
    ) -> None:
        super().__init__()
        if num_workers not in (0, 1):
            # The interleaved stream is one shard per rank, which one worker reads (decoding
            # ahead of the model); more workers would sit idle and break the per-rank padding.
            raise ValueError(f"data.num_workers must be 0 or 1, got {num_workers}")
        self.root = Path(root)
        self.audio_root = Path(audio_root) if audio_root else self.root / "audio"
        self.name, self.build_mini, self.mini_seed = name, build_mini, mini_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.rate, self.shuffle_buffer, self.seed = sampling_rate, shuffle_buffer, seed
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"data.max_instances must be a positive number or null, got {max_instances}")
        self.max_instances = max_instances  # smoke runs: the first N instances of each split
        self.skip_missing_audio = skip_missing_audio
        self.missing: dict[str, MissingAudio] = {}  # per use (fit, test): what was left out
        self._data: SakeData | None = None
        self._left_out: set[tuple] | None = None  # edits whose own clip is missing (after setup)

    def prepare_data(self) -> None:
        if self.build_mini:
            ensure_mini(self.root, self.mini_seed)

    def data(self) -> SakeData:
        """Every split, parsed once (the train split without the validation edits)."""
        if self._data is None:
            self._data = SakeData.load(self.root)
        return self._data

    def resolver(self) -> AudioResolver:
        return AudioResolver(self.audio_root)

    def train_pool(self, sampling_rate: int) -> SakeTrainPool:
        """The train split as editors draw on it (common.TrainPool), at the model's rate."""
        return SakeTrainPool(self.root, self.audio_root, sampling_rate, self.data)

    def find_missing(self, use: str, instances: list[EditInstance]) -> MissingAudio:
        """The clips `instances` need that are not on disk: a MissingAudioError saying which,
        unless skip_missing_audio (then they are kept in `self.missing[use]` for the reports)."""
        missing = find_missing(instances, self.resolver())
        if missing.files and not self.skip_missing_audio:
            raise MissingAudioError(
                f"{self.name} ({self.root}): the {use} data needs {missing.describe()} under "
                f"data.audio_root={self.audio_root}. Fetch them (python -m datamodules.sake check "
                f"{self.root} --audio-root {self.audio_root} lists them), or set "
                f"data.skip_missing_audio=true to drop the queries that need them."
            )
        if missing.files:
            log.warning("%s data: %s; the queries that need them are dropped", use, missing.describe())
            self.missing[use] = missing
        return missing

    def setup(self, stage: str | None = None) -> None:
        """Before training: every clip of the train and validation splits must be on disk (or,
        with skip_missing_audio, the edits whose clip is missing leave the streams)."""
        if stage not in (None, "fit", "validate") or self._left_out is not None:
            return
        instances = [*self.data().train, *self.data().val]
        missing = self.find_missing("fit", instances)
        gone = [i for i in instances if without_missing(i, missing) is None]
        self._left_out = {edit_key(i.raw, i.attribute) for i in gone}

    def files(self, split: str) -> list[tuple[Path, str | None]]:
        root = data_root(self.root)
        if split == "train":
            found = train_files(root)
        elif split == "val":
            found = [(root / VAL_FILE, None)] if (root / VAL_FILE).is_file() else []
        else:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split == "train" and not found:
            raise FileNotFoundError(f"{root}/{TRAIN_DIR}: no attribute files ({', '.join(ATTRIBUTES)})")
        return found

    def dataset(self, split: str, rank: int = 0, world_size: int = 1, even: bool = True) -> DecodedStream:
        """One rank's stream of a split: records in file order (train: shuffled through a buffer),
        the train split without the validation edits, and without edits whose clip is missing."""
        left_out = self._stream_left_out(split)
        stream = record_stream(self.files(split))
        if left_out:
            stream = stream.filter(lambda r: edit_key(r, r["_attribute"]) not in left_out)
        if split == "train":
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if self.max_instances:
            stream = stream.take(self.max_instances)
        total = self._stream_size(split, left_out)
        length = -(-total // world_size) if even and world_size > 1 else None
        missing = self.missing.get("fit")
        return DecodedStream(shard(stream, rank, world_size), self.resolver(), self.rate, length, missing)

    def batches(self, split: str, world_size: int = 1) -> int:
        """Batches in one rank's pass over `split` (the training progress log's ETA counts them)."""
        per_rank = -(-self._stream_size(split, self._stream_left_out(split)) // world_size)
        return -(-per_rank // self.batch_size)

    def _stream_left_out(self, split: str) -> set[tuple]:
        left_out = set(self._left_out or ())
        if split == "train":
            left_out |= validation_keys(data_root(self.root))
        return left_out

    def _stream_size(self, split: str, left_out: set[tuple]) -> int:
        instances = self.data().train if split == "train" else self.data().val
        total = sum(edit_key(i.raw, i.attribute) not in left_out for i in instances)
        return min(total, self.max_instances) if self.max_instances else total

    def eval_instances(self, split: str = "test") -> list[EditInstance]:
        """The single-editing instances of `split` (test, or val to tune on held-out edits),
        attributes taken in turn (gender, emotion, language, animal, gender, ...), so that the
        first `max_instances` cover every attribute. Clips that are missing stop the run, or
        with skip_missing_audio are left out (`missing[split]`)."""
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        items = self.data().test if split == "test" else self.data().val
        if not items:
            where = TEST_DIR if split == "test" else VAL_FILE
            raise FileNotFoundError(f"{data_root(self.root)}/{where}: no {split} instances")
        groups = [[i for i in items if i.attribute == a] for a in ATTRIBUTES]
        turns = [i for row in itertools.zip_longest(*groups) for i in row if i is not None]
        chosen = turns[: self.max_instances]
        return drop_missing(chosen, self.find_missing(split, chosen))

    def eval_sequences(self) -> list[list[EditInstance]]:
        """The sequential-editing sequences; with `max_instances`, their first N edits in order.
        Edits whose clip is missing are left out of their sequence (with skip_missing_audio)."""
        seqs = self.data().sequences
        if not seqs:
            raise FileNotFoundError(f"{data_root(self.root)}/{SEQ_FILE}: no sequential-editing file")
        out, left = [], self.max_instances or sum(len(s) for s in seqs)
        for seq in seqs:
            if left <= 0:
                break
            out.append(seq[:left])
            left -= len(out[-1])
        missing = self.find_missing("sequential", [i for s in out for i in s])
        return [drop_missing(s, missing) for s in out]

    def report(self) -> dict[str, Any]:
        """What the reports say about the data beyond its name: what was left out for missing
        audio (data.skip_missing_audio), per use."""
        if not self.missing:
            return {}
        return {"missing_audio": {use: m.report() for use, m in self.missing.items()}}

    def world(self) -> dict[str, Any] | None:
        """SAKE-mini's world.yaml (labels, knowledge base), or None for data without one."""
        path = Path(self.root) / "world.yaml"
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None

    def fingerprint(self) -> str:
        """A digest of the training and validation files (recorded with exported editors)."""
        h = hashlib.sha256()
        for path, _ in self.files("train") + self.files("val"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        return h.hexdigest()[:16]

    def _loader(self, split: str, skip: int = 0) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = self.dataset(split, rank, world)
        dataset.skip = skip
        return _OnceSkippingLoader(
            dataset, batch_size=self.batch_size, collate_fn=list, num_workers=self.num_workers,
            worker_init_fn=die_with_parent,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", skip=self.batches_to_skip() * self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.files("val") else []


def die_with_parent(worker_id: int) -> None:
    """A DataLoader worker ends with the training process, however that ends: a SIGKILLed
    `train.py` otherwise leaves its workers (blocked in the streaming dataset's reads) behind,
    each holding its share of memory. Linux's parent-death signal; elsewhere nothing is set."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _OnceSkippingLoader(DataLoader):
    """A DataLoader whose dataset's resume `skip` applies to the first iteration only."""

    def __iter__(self):
        it = super().__iter__()  # the dataset (and its skip) is captured here
        self.dataset.skip = 0
        return it
