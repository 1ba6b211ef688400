"""Which clips a set of edit instances needs that are not on disk, and dropping what needs them.

The real SAKE audio is downloaded separately, clip by clip, from several sources; a release can
be incomplete. A run checks before it starts: by default a missing clip is an error that says
which and how many; with `data.skip_missing_audio=true` the queries that need a missing clip are
dropped (the whole instance when its edit clip is missing) and the counts are reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from datamodules.audio_io import AudioResolver
from datamodules.schema import EditInstance


class MissingAudioError(FileNotFoundError):
    """Clips the data references are not under the audio root."""


@dataclass
class MissingAudio:
    """The missing clips of some instances, and what dropping them removed."""

    files: set[tuple[str, str | None]] = field(default_factory=set)  # (file, track)
    queries: int = 0  # queries dropped
    instances: int = 0  # instances dropped (their edit clip is missing)

    def by_track(self) -> Counter[str]:
        return Counter(track or "(no track)" for _, track in self.files)

    def describe(self, show: int = 3) -> str:
        tracks = ", ".join(f"{t} {n}" for t, n in sorted(self.by_track().items()))
        examples = ", ".join(sorted(f for f, _ in self.files)[:show])
        return f"{len(self.files)} clips missing ({tracks}), e.g. {examples}"

    def report(self) -> dict[str, object]:
        """For metrics.json."""
        return {
            "clips": len(self.files),
            "queries_dropped": self.queries,
            "instances_dropped": self.instances,
            "by_track": dict(sorted(self.by_track().items())),
        }


def find_missing(instances: Iterable[EditInstance], resolver: AudioResolver) -> MissingAudio:
    """The (file, track) pairs the instances reference that the resolver cannot find."""
    refs = {(q.file, q.track) for inst in instances for q in inst.queries() if q.file}
    return MissingAudio({r for r in refs if resolver.find(*r) is None})


def without_missing(inst: EditInstance, missing: MissingAudio) -> EditInstance | None:
    """`inst` without the queries whose clip is missing; None when its edit clip is."""
    if (inst.reliability.file, inst.reliability.track) in missing.files:
        return None

    def keep(queries: Sequence) -> tuple:
        return tuple(q for q in queries if q.file is None or (q.file, q.track) not in missing.files)

    return replace(
        inst,
        generality=keep(inst.generality),
        audio_locality=keep(inst.audio_locality),
        portability=keep(inst.portability),
    )


def drop_missing(instances: Sequence[EditInstance], missing: MissingAudio) -> list[EditInstance]:
    """The instances with what needs a missing clip dropped; counts go into `missing`."""
    out = []
    for inst in instances:
        kept = without_missing(inst, missing)
        if kept is None:
            missing.instances += 1
            missing.queries += sum(1 for _ in inst.queries())
            continue
        missing.queries += sum(1 for _ in inst.queries()) - sum(1 for _ in kept.queries())
        out.append(kept)
    return out
