"""The probing prompts of the AudioLens analyses (lens, knockout, enhancement) and the lens reading.

A probe asks about one auditory attribute of one clip in one of AudioLens's prompt variants:

- `sake`: SAKE's reliability question as the benchmark asks it; the answer starts the reply.
- `probe`: the clip alone, the reply prefilled up to the label ("The speaker's emotion is").
- `question`: the attribute question, then the same prefilled reply.
- `options`: the question with the attribute's labels listed, then the prefilled reply.
- `reversed`: the clip alone, the reply prefilled with the phrasing that names the attribute
  early ("The emotion of the speaker is"); read at the last position and at the
  attribute-mentioning one (the attribute word's last token).

Labels are read at their first token *as the model would start them there* (`label_tokens:
in_context`): after a prefilled "... is" the next token is the label with its leading space
(" happy"), at the start of a reply it is the bare word ("happy"). AudioLens's code tokenises
every label bare (`label_tokens: bare`): for byte-level BPE tokenizers (Llama-3, which DeSTA
uses; Qwen2's) " happy" and "happy" are different tokens, so after "is" the bare token is one
the model hardly ever emits there, and its probability measures something else than the
answer. Both are available; `in_context` is the default and the one the README's figures use.

When every label of an attribute starts with the same token after the prefill, that token says
nothing about which label follows: a tokenizer that knows a word only bare writes " English" as
a lone space token and "English" (the tiny model's does, for every language). The reply is then
prefilled through the shared tokens ("The speech's spoken language is ") and each label read at
its first token after them (`Probe.lead`); Qwen2's and Llama-3's tokenizers have " English" as
one token, and nothing changes there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from analysis.samples import Sample
from common.prompt import Prompt
from datamodules.schema import norm_label
from lalms.base import LALM, hidden
from lalms.hooks import Hook, hooked_all

VARIANTS = ("sake", "probe", "question", "options", "reversed")
LABEL_TOKENS = ("in_context", "bare")


@dataclass(frozen=True)
class Phrasing:
    """How the probes of one attribute are worded (configs/probes/*.yaml)."""

    word: str  # the attribute word, as it appears in `reversed`
    probe: str  # "The speaker's emotion"
    reversed: str  # "The emotion of the speaker"
    question: str  # "What is the emotion of the speaker in the speech?"

    @classmethod
    def parse(cls, attribute: str, raw: Mapping) -> Phrasing:
        missing = sorted({"word", "probe", "reversed", "question"} - set(raw))
        if missing:
            raise ValueError(f"probes.{attribute}: missing {', '.join(missing)}")
        phrasing = cls(**{k: str(raw[k]) for k in ("word", "probe", "reversed", "question")})
        if phrasing.word not in phrasing.reversed:
            raise ValueError(
                f"probes.{attribute}.reversed {phrasing.reversed!r} does not contain "
                f"its attribute word {phrasing.word!r}"
            )
        return phrasing


@dataclass(frozen=True)
class Probe:
    """One probing prompt: the question (with its clip), the reply begun, and where to read."""

    sample: Sample
    variant: str
    prompt: Prompt
    prefill: str  # the assistant's reply so far ("" when the answer starts the reply)
    reads: tuple[tuple[str, int], ...]  # (name, position counted from the end: -1 the last)
    lead: str = ""  # the end of `prefill` that every label shares there (module docstring)

    @property
    def stem(self) -> str:
        """The prefill without the labels' shared lead: what the labels continue."""
        return self.prefill[: len(self.prefill) - len(self.lead)]

    @property
    def attribute(self) -> str:
        return self.sample.instance.attribute


class Prober:
    """Builds the probes of samples and reads the lens on them."""

    def __init__(
        self,
        lalm: LALM,
        phrasings: Mapping[str, Mapping],
        labels: Mapping[str, Sequence[str]],
        *,
        is_word: str = " is",
        label_tokens: str = "in_context",
    ) -> None:
        if label_tokens not in LABEL_TOKENS:
            raise ValueError(f"label_tokens must be one of {LABEL_TOKENS}, got {label_tokens!r}")
        self.lalm = lalm
        self.phrasings = {a: Phrasing.parse(a, p) for a, p in phrasings.items()}
        self.labels = {a: tuple(v) for a, v in labels.items()}
        self.is_word = is_word
        self.label_tokens = label_tokens
        es = lalm.edit_sites
        if es.final_norm is None or es.lm_head is None:
            raise ValueError("the logit lens needs the model's final norm and lm_head (model.edit_sites.*)")
        self.layers = [lalm.model.get_submodule(f"{es.llm_layers}.{i}") for i in range(es.num_llm_layers)]
        self.norm = lalm.model.get_submodule(es.final_norm)
        self.head = lalm.model.get_submodule(es.lm_head)

    @classmethod
    def from_config(
        cls, lalm: LALM, probes: Mapping, labels: Mapping[str, Sequence[str]], spelled_as: Sequence = ()
    ) -> Prober:
        """The prober a `probes` config (configs/probes/*.yaml) describes, its labels spelled as
        the instances `spelled_as` write them (`spelled_labels`)."""
        return cls(lalm, probes["phrasings"], spelled_labels(labels, spelled_as), is_word=probes["is_word"],
                   label_tokens=probes["label_tokens"])  # fmt: skip

    # ----------------------------------------------------------------- building probes
    def phrasing(self, attribute: str) -> Phrasing:
        if attribute not in self.phrasings:
            raise ValueError(f"no probe phrasing for attribute {attribute!r} (analysis.run.probes)")
        return self.phrasings[attribute]

    def probe(self, sample: Sample, variant: str) -> Probe:
        """`sample` asked in `variant` (one of VARIANTS)."""
        clip = sample.prompt
        ask = lambda text: Prompt(text, clip.audio, clip.system, sampling_rate=clip.sampling_rate)  # noqa: E731
        if variant == "sake":
            return Probe(sample, variant, clip, "", (("last", -1),))
        attribute = sample.instance.attribute
        p = self.phrasing(attribute)
        if variant == "reversed":
            stem = p.reversed + self.is_word
            lead = self.shared_lead(stem, attribute)
            where = self.position_of(stem + lead, p.word)
            return Probe(sample, variant, ask(""), stem + lead, (("last", -1), ("attribute", where)), lead)
        stem = p.probe + self.is_word
        lead = self.shared_lead(stem, attribute)
        prompts = {
            "probe": "",
            "question": p.question,
            "options": f"{p.question} Possible options: {', '.join(self.labels[attribute])}.",
        }
        if variant not in prompts:
            raise ValueError(f"unknown probe variant {variant!r} (one of {', '.join(VARIANTS)})")
        return Probe(sample, variant, ask(prompts[variant]), stem + lead, (("last", -1),), lead)

    def ids(self, text: str) -> list[int]:
        return self.lalm.tokenizer(text, add_special_tokens=False).input_ids

    def position_of(self, prefill: str, word: str) -> int:
        """The position of `word`'s last token in the reply `prefill`, counted from the end."""
        full = self.ids(prefill)
        upto = self.ids(prefill[: prefill.index(word) + len(word)])
        if full[: len(upto)] != upto:
            raise ValueError(f"{prefill!r}: its tokens up to {word!r} are not a prefix of its own tokens")
        return len(upto) - 1 - len(full)

    def continuation(self, prefill: str, label: str) -> list[int]:
        """The tokens of `label` as the model would write it after `prefill` (the bare label's at
        the start of the reply, or with label_tokens=bare)."""
        if self.label_tokens == "bare" or not prefill:
            return self.ids(label)
        before, after = self.ids(prefill), self.ids(f"{prefill} {label}")
        if after[: len(before)] != before or len(after) == len(before):
            raise ValueError(f"{prefill!r} + {label!r}: the label does not start a token of its own")
        return after[len(before) :]

    def shared_lead(self, prefill: str, attribute: str) -> str:
        """The text of the tokens every label of `attribute` starts with after `prefill` (never a
        label's last one), "" when their first tokens differ or the tokens do not read back as
        text that extends the prefill exactly."""
        if self.label_tokens == "bare" or not prefill:
            return ""
        seqs = [self.continuation(prefill, lab) for lab in self.labels[attribute]]
        n = 0
        while all(len(s) > n + 1 for s in seqs) and len({s[n] for s in seqs}) == 1:
            n += 1
        if n == 0:
            return ""
        lead = self.lalm.tokenizer.decode(seqs[0][:n])
        return lead if self.ids(prefill + lead) == self.ids(prefill) + seqs[0][:n] else ""

    def label_token(self, prefill: str, label: str, lead: str = "") -> int:
        """The first token of `label` as the model would start it after `prefill`, past the
        labels' shared `lead` (the text `shared_lead` gave for that prefill)."""
        return self.continuation(prefill, label)[len(self.ids(prefill + lead)) - len(self.ids(prefill))]

    def label_ids(self, probe: Probe, labels: Sequence[str] | None = None) -> list[int]:
        """First tokens of the attribute's labels (or of `labels`), in order (may repeat)."""
        labels = labels or self.labels[probe.attribute]
        return [self.label_token(probe.stem, lab, probe.lead) for lab in labels]

    def right(self, probe: Probe, label: str | None = None) -> int:
        """Index of `label` (default: the clip's label) among the attribute's labels."""
        label = norm_label(label or probe.sample.truth)
        names = [norm_label(lab) for lab in self.labels[probe.attribute]]
        if label not in names:
            raise ValueError(f"label {label!r} is not one of {probe.attribute}'s labels {names}")
        return names.index(label)

    # ----------------------------------------------------------------- encoding and reading
    def encode(self, probes: Sequence[Probe]) -> dict[str, torch.Tensor]:
        """The batch of `probes`, each reply begun with its prefill (left padded: the replies end
        together, so a position counted from the end is the same for every row)."""
        lalm = self.lalm
        batch = lalm.encode([p.prompt for p in probes], [p.prefill for p in probes])
        cut = len(lalm.answer_suffix_ids)  # the turn is not closed: the reply goes on
        batch.pop("labels")
        for key in ("input_ids", "attention_mask"):
            batch[key] = batch[key][:, : batch[key].shape[1] - cut]
        return batch

    @torch.no_grad()
    def read(self, probes: Sequence[Probe], positions: Sequence[int]) -> torch.Tensor:
        """(probes, positions, layers, vocab): softmax(lm_head(final_norm(h))) of every LLM layer's
        output at `positions` (counted from the end). Layer outputs are taken before the final
        norm, so every layer gets it once and the last layer's reading is the model's output."""
        states: list[torch.Tensor] = []
        index = torch.tensor(list(positions))

        def keep(m, a, out):
            h = hidden(out)
            states.append(h[:, (index % h.shape[1]).to(h.device)])

        lalm = self.lalm
        with hooked_all(Hook(layer, keep) for layer in self.layers):
            lalm.logits(lalm.to_device(self.encode(probes)))
        stacked = torch.stack(states, dim=2)  # (B, P, L, d)
        return self.head(self.norm(stacked)).float().softmax(-1)

    def label_probabilities(
        self, probes: Sequence[Probe], positions: Sequence[int], probs: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per probe, (positions, layers, labels): the lens probability of each label's first
        token (`probs` from `read`, or read now)."""
        probs = self.read(probes, positions) if probs is None else probs
        return [p[..., self.label_ids(probe)] for probe, p in zip(probes, probs, strict=True)]


def spelled_labels(labels: Mapping[str, Sequence[str]], instances: Sequence) -> dict[str, tuple[str, ...]]:
    """`labels` as the data writes them (its instances' original and target labels, e.g.
    "Korean" for the schema's "korean"); a label the data does not use stays as given. A label is
    read at its first token, and "korean" and "Korean" start with different tokens: the data's
    spelling is the one the model was taught to answer with."""
    seen: dict[tuple[str, str], str] = {}
    for inst in instances:
        for label in (inst.original, inst.target):
            seen.setdefault((inst.attribute, norm_label(label)), label)
    return {a: tuple(seen.get((a, norm_label(lab)), lab) for lab in labs) for a, labs in labels.items()}


def leads(p_labels: torch.Tensor, right: int, label_ids: Sequence[int]) -> torch.Tensor:
    """Whether the right label is the most probable of the labels (last dim of `p_labels`): it
    must beat every label whose first token differs from its own (labels sharing its first token
    cannot be told apart at one token and are not rivals)."""
    rivals = [j for j, t in enumerate(label_ids) if t != label_ids[right]]
    if not rivals:
        return torch.ones(p_labels.shape[:-1], dtype=torch.bool, device=p_labels.device)
    return (p_labels[..., right : right + 1] > p_labels[..., rivals]).all(-1)


def share(p_labels: torch.Tensor, right: int, label_ids: Sequence[int]) -> torch.Tensor:
    """The right label's probability normalised over the labels' distinct first tokens (chance:
    1 / the number of distinct first tokens)."""
    distinct = sorted({t: j for j, t in enumerate(label_ids)}.values())
    if right not in distinct:  # the same token listed twice: its first index stands for it
        right = distinct[[label_ids[j] for j in distinct].index(label_ids[right])]
    return p_labels[..., right] / p_labels[..., distinct].sum(-1).clamp_min(1e-30)
