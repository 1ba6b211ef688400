"""The LALM adapter contract, checked the same way on a tiny model of every family (Qwen2-Audio,
Audio Flamingo 3, DeSTA2.5)."""

import numpy as np
import pytest
import torch

from lalms import Prompt, Turn
from lalms.base import IGNORE_INDEX


def test_tiny_models_are_tiny(lalm):
    n = sum(p.numel() for p in lalm.model.parameters())
    assert 1e6 <= n <= 3e6


def test_forward_loss_and_generate_on_two_audio_questions(lalm, clips):
    prompts = [Prompt("Which animal is this?", audio=clips[0]), Prompt("Which language?", audio=clips[1])]
    assert not any(p.requires_grad for p in lalm.model.parameters())  # frozen: editors train copies
    lalm.model.requires_grad_(True)  # as pretraining does
    try:
        loss = lalm.loss(prompts, ["dog", "English"])
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in lalm.model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    finally:
        lalm.model.zero_grad(set_to_none=True)
        lalm.model.requires_grad_(False)
    answers = lalm.generate(prompts, max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_labels_cover_exactly_the_answer_tokens(lalm, clips):
    prompts = [Prompt("Which animal is this?", audio=clips[0]), Prompt("What is the capital of France?")]
    answers = ["a barking dog", "Paris"]
    batch = lalm.encode(prompts, answers)
    for row, answer in enumerate(answers):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        expected = lalm.tokenizer(answer, add_special_tokens=False).input_ids + lalm.answer_suffix_ids
        assert labelled.tolist() == expected
        # the labelled span is the tail of the row: nothing of the prompt is labelled
        ids = batch["input_ids"][row]
        assert ids[-len(expected) :].tolist() == expected
    # padding is on the left and unlabelled
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_audio_placeholders_match_the_clips(lalm, clips):
    tone, noise = clips
    prompts = [
        Prompt("Which animal is this?", audio=tone),
        Prompt("And this one?", audio=noise, history=(Turn("What is this?", audio=tone, answer="a tone"),)),
        Prompt("Text only."),
    ]
    batch = lalm.encode(prompts)
    n_tokens = (batch["input_ids"] == lalm.audio_token_id).sum(dim=1).tolist()
    assert n_tokens[2] == 0
    # the one-clip row holds the tone's tokens; the two-clip row the tone's plus the noise's
    one = lalm.encode([Prompt("x", audio=tone)])
    two = lalm.encode([Prompt("x", audio=noise)])
    per_tone = int((one["input_ids"] == lalm.audio_token_id).sum())
    per_noise = int((two["input_ids"] == lalm.audio_token_id).sum())
    assert per_noise > 1 and per_tone > 1
    assert n_tokens[:2] == [per_tone, per_tone + per_noise]
    feature_key = next(k for k in batch if k.endswith("features"))
    assert batch[feature_key].shape[0] == 3  # three clips in order of appearance


def test_batching_does_not_change_losses_or_answers(lalm, clips):
    prompts = [
        Prompt("Which animal is this?", audio=clips[0]),
        Prompt("A longer question about the language that is spoken here?", audio=clips[1]),
        Prompt("What is the capital of France?"),
    ]
    answers = ["dog", "German", "Paris"]
    batched = lalm.loss(prompts, answers, reduction="none")
    single = torch.stack([lalm.loss([p], [a]) for p, a in zip(prompts, answers, strict=True)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    assert lalm.generate(prompts, max_new_tokens=6) == [
        lalm.generate([p], max_new_tokens=6)[0] for p in prompts
    ]


def test_generation_is_greedy_and_deterministic(lalm, clips):
    prompt = [Prompt("Which animal is this?", audio=clips[0])]
    assert lalm.generation_config(4).do_sample is False
    assert lalm.generate(prompt, max_new_tokens=6) == lalm.generate(prompt, max_new_tokens=6)


def test_system_prompt_and_history_are_rendered(lalm, clips):
    text = lalm.render(
        Prompt(
            "Now?", audio=clips[0], system="Listen.", history=(Turn("Before?", audio=clips[1], answer="yes"),)
        )
    )
    assert text.index("Listen.") < text.index("Before?") < text.index("yes") < text.index("Now?")
    assert text.count(lalm.audio_token) == 2
    with pytest.raises(ValueError, match="no answer"):
        lalm.render(Prompt("Now?", history=(Turn("Before?"),)))


def test_audio_token_in_question_text_is_rejected(lalm, clips):
    with pytest.raises(ValueError, match="audio placeholders"):
        lalm.encode([Prompt(f"Is {lalm.audio_token} here?", audio=clips[0])])


@pytest.mark.parametrize(
    ("audio", "match"),
    [
        (np.zeros((2, 16000), np.float32), "1-D"),
        (np.zeros(16000, np.int16), "float"),
        (np.full(16000, np.nan, np.float32), "non-finite"),
        ([0.0] * 16000, "numpy array or tensor"),
        (np.zeros(100, np.float32), "shorter than"),
    ],
)
def test_bad_audio_raises_a_clear_error(lalm, audio, match):
    with pytest.raises(ValueError, match=match):
        lalm.encode([Prompt("Which animal?", audio=audio)])


def test_audio_at_another_rate_is_resampled(lalm, clips):
    tone = clips[0]
    at_8k = Prompt("Which animal?", audio=tone[::2].copy(), sampling_rate=8000)
    same = lalm.encode([Prompt("Which animal?", audio=tone)])
    resampled = lalm.encode([at_8k])
    assert resampled["input_ids"].tolist() == same["input_ids"].tolist()  # same duration, same token count
    with pytest.raises(ValueError, match="sampling rate"):
        lalm.encode([Prompt("Which animal?", audio=tone, sampling_rate=0)])


def test_saved_model_reloads_identically(lalm, clips, tmp_path):
    prompts, answers = [Prompt("Which animal?", audio=clips[0])], ["dog"]
    before = lalm.loss(prompts, answers)
    from tests.helpers import load_model

    reloaded = load_model(type(lalm), lalm.save(tmp_path / "copy"))  # the loading settings a config gives
    torch.testing.assert_close(reloaded.loss(prompts, answers), before, atol=0, rtol=0)


def test_the_fingerprint_covers_every_value(tiny_dirs):
    """One changed weight (the smallest step of one value) gives another fingerprint, on the
    CPU path and on the accelerator path (run here on CPU tensors)."""
    from lalms import Qwen2Audio
    from lalms.base import device_digest
    from tests.helpers import load_model

    lalm = load_model(Qwen2Audio, tiny_dirs["qwen2_audio"])
    before = lalm.fingerprint()
    weight = next(lalm.model.parameters())
    flat = weight.detach().reshape(-1).view(torch.uint8)
    digest = device_digest(flat)
    with torch.no_grad():
        value = weight.view(-1)[weight.numel() // 2].clone()
        weight.view(-1)[weight.numel() // 2] = torch.nextafter(value, value + 1)
    assert lalm.fingerprint() != before
    assert device_digest(weight.detach().reshape(-1).view(torch.uint8)) != digest
    with torch.no_grad():
        weight.view(-1)[weight.numel() // 2] = value
    assert lalm.fingerprint() == before and device_digest(flat) == digest
