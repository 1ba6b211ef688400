"""Edit-parallel sweeps (evaluate.py edits_per_batch=K): K edits in one batched generation, each
row seeing the model as edited by its own edit only, give K=1's answers; nothing leaks into
other rows; nothing is left on the model; a batch a kill cut short resumes to the same results;
K is part of a run's identity; the memory model chooses K from the shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.hparams import to_dict
from datamodules.audio_io import AudioResolver
from datamodules.examples import PromptMaker
from editors.checkpoint import save_editor
from editors.hypernet import HypernetEditor
from evaluation import batching
from evaluation.records import ResultsLog, read_lines
from evaluation.sweep import request
from lalms.rows import RowEdits
from tests.helpers import configured
from tests.test_drift import EDITORS, hooks, state
from tests.test_evaluation import Recorder, evaluate_cli, strip_time, sweeper

# The editors whose K=16 answers are held against K=1's in process (the drift test's weight
# editors with small settings, and the hook and context editors as configured).
BATCHED = {
    **EDITORS,
    "steering": lambda lalm, pool: configured("steering", lalm, pool, "editor.hparams.samples=8"),
    "i_ike": lambda lalm, pool: configured("i_ike", lalm, pool),
    "rome_audio": lambda lalm, pool: configured(
        "rome_audio",
        lalm,
        pool,
        "editor.hparams.corpus.text=10",
        "editor.hparams.corpus.audio=5",
        "editor.hparams.corpus.cache_dir=null",
        "editor.hparams.search.steps=10",
    ),
}


def posts(records):
    return [q["post"] for r in records for q in r["queries"]]


@pytest.mark.parametrize("name", sorted(BATCHED))
def test_sixteen_edits_in_one_batch_answer_as_one_at_a_time(
    name, shipped_lalm, pool, mini, mini_dir, tmp_path
):
    editor = BATCHED[name](shipped_lalm, pool)
    items = mini.test[:16]
    runs = {}
    for k in (1, 16):
        log = ResultsLog(tmp_path / f"k{k}.jsonl")
        sweeper(shipped_lalm, editor, mini_dir, edits_per_batch=k).single(items, log)
        runs[k] = read_lines(log.path)[0]
    one, many = posts(runs[1]), posts(runs[16])
    assert len(one) == len(many) > 100
    same = sum(a == b for a, b in zip(one, many, strict=True))
    assert same / len(one) >= 0.995, f"{name}: {same}/{len(one)} answers equal"
    changed = sum(q["post"] != q["pre"] for r in runs[1] for q in r["queries"])
    assert changed > 0, f"{name}: the edits should change some answers, or this checks nothing"


@pytest.mark.parametrize("name", ["mend", "ft_llm", "steering", "wise"])
def test_an_edit_reaches_only_its_own_rows(name, shipped_lalm, pool, mini, mini_dir):
    """Half of a batch's rows edited, the other half unedited (group -1): the unedited rows
    answer token for token (and logit for logit) as the unedited model, the edited ones not all."""
    editor = BATCHED[name](shipped_lalm, pool)
    prompt = PromptMaker(AudioResolver(mini_dir / "audio"), shipped_lalm.sampling_rate)
    inst = mini.test[0]
    queries = [prompt(q) for q in inst.queries()]
    rows = queries + queries
    groups = [0] * len(queries) + [-1] * len(queries)
    unedited = shipped_lalm.generate(rows, 16)
    enc = shipped_lalm.encode(rows)
    with torch.no_grad():
        logits = shipped_lalm.logits(enc)
    edit = editor.apply_rows([request(inst, prompt(inst.reliability))])
    try:
        with edit.rows(rows, groups) as asked:
            answered = shipped_lalm.generate(asked, 16)
        with edit.rows(rows, groups), torch.no_grad():
            edited_logits = shipped_lalm.logits(enc)
    finally:
        edit.undo()
    half = len(queries)
    assert answered[half:] == unedited[half:]
    assert torch.equal(edited_logits[half:], logits[half:])
    assert not torch.equal(edited_logits[:half], logits[:half]), "the edit should change its own rows"


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_batched_edits_leave_no_drift(name, shipped_lalm, pool, mini, mini_dir):
    """After batched edits (single batches and sequences side by side) every parameter and
    buffer is bitwise what it was, and no hook is left."""
    before, hooked = state(shipped_lalm), hooks(shipped_lalm)
    editor = EDITORS[name](shipped_lalm, pool)
    prompt = PromptMaker(AudioResolver(mini_dir / "audio"), shipped_lalm.sampling_rate)
    reqs = [request(inst, prompt(inst.reliability)) for inst in mini.test[:4]]
    edit = editor.apply_rows(reqs[:2])
    edit.add([reqs[2], None])  # sequential: a second edit for group 0 only
    with edit.rows([reqs[3].prompt] * 3, [0, 1, -1]) as asked:
        shipped_lalm.generate(asked, 4)
    edit.undo()
    after = state(shipped_lalm)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert hooks(shipped_lalm) == hooked
    with pytest.raises(RuntimeError, match="undone"):
        edit.undo()


def test_sequences_side_by_side_equal_one_at_a_time(shipped_lalm, pool, mini, mini_dir, tmp_path):
    """Sequential editing: three sequences side by side (each its own accumulated edits) give the
    lines of one sequence at a time."""
    editor = EDITORS["rome"](shipped_lalm, pool)
    sequences = [seq[:4] for seq in mini.sequences[:3]]
    runs = {}
    for k in (1, 3):
        log = ResultsLog(tmp_path / f"seq{k}.jsonl")
        sweeper(shipped_lalm, editor, mini_dir, edits_per_batch=k).sequential(sequences, log, 3, 2)
        runs[k] = sorted(read_lines(log.path)[0], key=lambda r: (r["sequence"], r["step"]))
    flat = [[q["post"] for e in r["evals"] for q in e["queries"]] for r in runs[1]]
    assert [[q["post"] for e in r["evals"] for q in e["queries"]] for r in runs[3]] == flat
    assert [(r["sequence"], r["step"], [e["gap"] for e in r["evals"]]) for r in runs[3]] == [
        (r["sequence"], r["step"], [e["gap"] for e in r["evals"]]) for r in runs[1]
    ]


def test_a_batch_cut_short_by_a_kill_resumes_to_the_same_results(shipped_lalm, mini, mini_dir, tmp_path):
    """Killed after 5 of a 16-edit batch's lines (and a torn sixth): the resumed run evaluates
    that batch whole again, writes only the missing lines, and ends with the uninterrupted
    run's lines."""
    editor = HypernetEditor(configured("mend", shipped_lalm, None, "editor.hparams.edit_lr=5.0"))
    items = mini.test[:20]
    whole = ResultsLog(tmp_path / "whole.jsonl")
    sweeper(shipped_lalm, editor, mini_dir, edits_per_batch=16).single(items, whole)
    lines = whole.path.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:5]) + lines[5][:40])
    resumed = ResultsLog(part)
    assert len(resumed.records) == 5
    sweeper(shipped_lalm, editor, mini_dir, edits_per_batch=16).single(items, resumed)
    assert strip_time(read_lines(part)[0]) == strip_time(read_lines(whole.path)[0])


def test_edits_per_batch_needs_the_capability(shipped_lalm, mini_dir):
    with pytest.raises(ValueError, match="cannot evaluate several edits"):
        sweeper(shipped_lalm, Recorder(), mini_dir, edits_per_batch=4)
    with pytest.raises(ValueError, match="no apply_rows"):
        batching.plan(4, Recorder(), shipped_lalm, 10, 100, 160, 8)
    assert batching.plan("auto", Recorder(), shipped_lalm, 10, 100, 160, 8).edits_per_batch == 1
    with pytest.raises(ValueError, match="whole number"):
        batching.plan(0, Recorder(), shipped_lalm, 10, 100, 160, 8)


def test_the_memory_model_bounds_what_a_batch_holds_and_limits_k(shipped_lalm, pool, mini, mini_dir):
    editor = HypernetEditor(configured("mend", shipped_lalm, None, "editor.hparams.edit_lr=5.0"))
    prompt = PromptMaker(AudioResolver(mini_dir / "audio"), shipped_lalm.sampling_rate)
    reqs = [request(inst, prompt(inst.reliability)) for inst in mini.test[:4]]
    tokens = int(
        shipped_lalm.encode([r.prompt for r in reqs], [r.target for r in reqs])["input_ids"].shape[1]
    )
    edit = editor.apply_rows(reqs)
    try:
        held = sum(
            left.numel() * left.element_size() + right.numel() * right.element_size()
            for state in edit.edits._low_rank.values()
            for group in state.groups
            for left, right in group
        )
    finally:
        edit.undo()
    rows = editor.rows_memory(tokens)
    assert held <= len(reqs) * rows.per_edit
    assert held > 0
    # auto: fills batch_size rows when memory allows, fewer when it does not, at least one
    roomy = batching.plan("auto", editor, shipped_lalm, 10, tokens, 160, 8, free=1 << 40)
    assert roomy.edits_per_batch == 16
    need = roomy.memory_bytes
    tight = batching.plan("auto", editor, shipped_lalm, 10, tokens, 160, 8, free=need // 3)
    assert 1 <= tight.edits_per_batch < 16 and tight.memory_bytes <= 0.9 * need // 3 + rows.per_edit
    assert batching.plan("auto", editor, shipped_lalm, 10, tokens, 160, 8, free=0).edits_per_batch == 1


def test_row_groups_follow_prompts_into_the_audio_encoder(shipped_lalm):
    """The audio encoder's batch is the clips: a text-only prompt holds none, so clip groups are
    the groups of the prompts that hold audio, in order."""
    import numpy as np

    from common.prompt import Prompt

    edits = RowEdits(shipped_lalm.model, shipped_lalm.edit_sites, 3)
    clip = np.zeros(1600, dtype=np.float32)
    prompts = [Prompt("a", clip), Prompt("b"), Prompt("c", clip)]
    path = shipped_lalm.edit_sites.resolve("audio.layers.0.fc2")
    with edits.rows(prompts, [2, 0, 1]):
        assert edits.groups_of(path, 2, torch.device("cpu")).tolist() == [2, 1]
        assert edits.groups_of("llm.x", 3, torch.device("cpu")).tolist() == [2, 0, 1]
        with pytest.raises(RuntimeError, match="batch of 4"):
            edits.groups_of(path, 4, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="outside"):
        edits.groups_of(path, 2, torch.device("cpu"))


@pytest.fixture(scope="module")
def export(shipped_lalm, tmp_path_factory):
    net = configured("mend", shipped_lalm, None, "editor.hparams.rank=16", "editor.hparams.edit_lr=5.0")
    return save_editor(
        net, "editors.mend.MEND", to_dict(net.hp), tmp_path_factory.mktemp("ed") / "mend", "mend"
    )


ROME_SMALL = (
    "editor=rome",
    "editor.hparams.corpus.text=10",
    "editor.hparams.corpus.audio=5",
    "editor.hparams.corpus.cache_dir=null",
    "editor.hparams.search.steps=10",
)


def compare_cli(editor_args, mini_dir, tmp_path, instances: int = 48):
    """evaluate.py at K=1 and K=16 on `instances` instances: answers and metrics compared."""
    common = [
        *editor_args, f"data.root={mini_dir}", "data.build_mini=false", f"data.max_instances={instances}",
        f"response_cache={tmp_path / 'cache.sqlite'}", "max_new_tokens=8", "sweeps=[single]",
    ]  # fmt: skip
    for k in (1, 16):
        evaluate_cli(*common, f"edits_per_batch={k}", f"hydra.run.dir={tmp_path / f'k{k}'}")
    one, many = (json.loads((tmp_path / f"k{k}" / "metrics.json").read_text()) for k in (1, 16))
    assert one["identity"]["generation"]["edits_per_batch"] == 1
    assert many["identity"]["generation"]["edits_per_batch"] == 16
    a, b = (posts(read_lines(tmp_path / f"k{k}" / "single" / "results.jsonl")[0]) for k in (1, 16))
    assert len(a) == len(b) >= 9 * instances
    assert sum(x == y for x, y in zip(a, b, strict=True)) / len(a) >= 0.995
    for key, value in one["overall"].items():
        assert abs(value - many["overall"][key]) <= 0.5, key
    return common


def test_evaluate_py_with_sixteen_edits_per_batch_scores_as_one(export, mini_dir, tmp_path):
    """Through the command: MEND at K=16 gives K=1's answers and metrics; a folder of one K
    refuses a run of the other, naming it; resuming a run cut short keeps its metrics."""
    common = compare_cli([f"ckpt={export}"], mini_dir, tmp_path)
    refused = evaluate_cli(*common, "edits_per_batch=1", f"hydra.run.dir={tmp_path / 'k16'}", check=False)
    assert refused.returncode != 0 and "generation.edits_per_batch: 16 there, 1 now" in refused.stderr
    results = tmp_path / "k16" / "single" / "results.jsonl"
    whole = json.loads((tmp_path / "k16" / "metrics.json").read_text())["overall"]
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:21]))  # killed mid-way through the second batch
    evaluate_cli(*common, "edits_per_batch=16", f"hydra.run.dir={tmp_path / 'k16'}")
    assert json.loads((tmp_path / "k16" / "metrics.json").read_text())["overall"] == whole


@pytest.mark.slow
def test_evaluate_py_batches_rome(mini_dir, tmp_path):
    compare_cli(ROME_SMALL, mini_dir, tmp_path, instances=32)


@pytest.mark.slow
def test_ie_ike_batches_its_demonstrations(shipped_lalm, pool, mini, mini_dir, tmp_path):
    BATCHED["ie_ike"] = lambda lalm, pool: configured("ie_ike", lalm, pool)
    test_sixteen_edits_in_one_batch_answer_as_one_at_a_time(
        "ie_ike", shipped_lalm, pool, mini, mini_dir, tmp_path
    )


# The rest of the list through the command (each ~1-2 minutes on two cores).
SLOW = {
    "ke": (),  # a trained editor: an (untrained) export, as train.py writes it
    "alphaedit": (
        "editor=alphaedit",
        "editor.hparams.corpus.text=10",
        "editor.hparams.corpus.audio=5",
        "editor.hparams.corpus.cache_dir=null",
        "editor.hparams.search.steps=10",
    ),
    "ft_llm": ("editor=ft_llm", "editor.hparams.max_steps=3"),
    "wise": (
        "editor=wise",
        "editor.hparams.training.steps=3",
        "editor.hparams.preservation.text=2",
        "editor.hparams.preservation.audio=2",
    ),  # fmt: skip
    "unke": (
        "editor=unke",
        "editor.hparams.target.steps=5",
        "editor.hparams.block.steps=3",
        "editor.hparams.preservation.text=2",
        "editor.hparams.preservation.audio=1",
    ),  # fmt: skip
    "steering": ("editor=steering", "editor.hparams.samples=8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW))
def test_evaluate_py_batches_every_editor(name, mini_dir, tmp_path, shipped_lalm):
    args = SLOW[name]
    if name == "ke":
        net = configured("ke", shipped_lalm, None, "editor.hparams.max_scale=1e3")
        args = (f"ckpt={save_editor(net, 'editors.ke.KE', to_dict(net.hp), tmp_path / 'ke', 'ke')}",)
    compare_cli(args, mini_dir, tmp_path / "runs")


def test_make_run_and_the_sweeps_batch_by_default():
    from tests.helpers import composed

    cfg = composed("evaluate", "editor=rome")
    assert cfg.edits_per_batch == "auto" and cfg.batch_size >= 16 * 10
    assert Path(__file__).resolve().parents[1].joinpath("Makefile").read_text().count("edits_per_batch") == 0
