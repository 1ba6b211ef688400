"""Audio faults, the DataModule's items, and DDP sharding."""

import numpy as np
import pytest
import soundfile as sf

from datamodules import AudioError, AudioResolver, EditExample, SakeDataModule, load_audio
from datamodules.datamodule import record_stream
from datamodules.sake import main as sake_main

from .conftest import SMALL_MINI


def test_audio_faults_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: no such audio file"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="garbage.wav: unreadable"):
        load_audio(tmp_path / "garbage.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: empty"):
        load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav: non-finite"):
        load_audio(tmp_path / "nan.wav")


def test_audio_is_mono_and_resampled(tmp_path):
    stereo = np.stack([np.ones(8000), -np.ones(8000) * 0.5], axis=1).astype(np.float32) * 0.5
    sf.write(tmp_path / "s.wav", stereo, 8000, subtype="FLOAT")
    wave = load_audio(tmp_path / "s.wav", 16000)
    assert wave.ndim == 1 and wave.dtype == np.float32 and len(wave) == 16000
    assert wave[4000:12000] == pytest.approx(0.125, abs=1e-3)


def test_resolver_finds_per_track_and_flat_layouts(tmp_path):
    (tmp_path / "Animal").mkdir()
    sf.write(tmp_path / "Animal" / "a.wav", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "b.wav", np.zeros(1600, np.float32), 16000)
    r = AudioResolver(tmp_path)
    assert r.path("a.wav", "Animal") == tmp_path / "Animal" / "a.wav"
    assert r.path("b.wav", "Animal") == tmp_path / "b.wav"
    with pytest.raises(AudioError, match="'c.wav' .*not found"):
        r.path("c.wav", "Animal")


def test_check_counts_missing_and_unreadable_audio(mini_dir, tmp_path, capsys):
    import shutil

    audio = tmp_path / "audio"
    shutil.copytree(mini_dir / "audio", audio)
    victims = sorted((audio / "Animal").glob("*.ogg"))[:2]
    victims[0].unlink()
    victims[1].write_bytes(b"broken")
    assert sake_main(["check", str(mini_dir), "--audio-root", str(audio)]) == 1
    out = capsys.readouterr().out
    assert "1 missing, 1 unreadable" in out and victims[0].name in out and victims[1].name in out
    assert "missing Animal: 1" in out


def test_datamodule_yields_decoded_edit_examples(mini_dir):
    dm = SakeDataModule(str(mini_dir), num_workers=0, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 and all(isinstance(x, EditExample) for x in batch)
    ex = batch[0]
    assert ex.edit.answer == ex.instance.target and ex.edit.prompt.audio.ndim == 1
    assert len(ex.generality) == 3 and all(g.prompt.audio is not None for g in ex.generality)
    assert ex.locality[-1].prompt.audio is None  # text locality
    first = [r["_attribute"] for r in record_stream(dm.files("train")).take(4)]  # round-robin over files
    assert sorted(first) == ["animal", "emotion", "gender", "language"]
    req = ex.request()
    assert req.target == ex.instance.target and req.original == ex.instance.original
    assert req.prompt is ex.edit.prompt


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ddp_shards_are_complete_and_disjoint(mini_dir, world_size):
    dm = SakeDataModule(str(mini_dir), num_workers=0)
    total = 4 * SMALL_MINI["train_per_attribute"]
    keys = [
        [(x.instance.source, x.instance.index) for x in dm.dataset("train", rank, world_size, even=False)]
        for rank in range(world_size)
    ]
    flat = [k for part in keys for k in part]
    assert len(flat) == len(set(flat)) == total
    even = [sum(1 for _ in dm.dataset("train", rank, world_size)) for rank in range(world_size)]
    assert len(set(even)) == 1 and even[0] == -(-total // world_size)


def test_more_than_one_worker_is_refused(mini_dir):
    with pytest.raises(ValueError, match="num_workers must be 0 or 1"):
        SakeDataModule(str(mini_dir), num_workers=4)
