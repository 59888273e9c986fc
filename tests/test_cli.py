"""The `ldm-jax` command: data, tokenizer and codec commands as a user runs them."""

import os

import numpy as np
import pytest
import soundfile as sf

from ldm_jax import cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    assert cli.main(["data", "build", "synthetic_music", "--data-dir", d,
                     "--config.data.num_train=6", "--config.data.num_test=2",
                     "--config.data.clip_seconds=0.5"]) == 0
    return d


def test_data_show_and_tokenizer(data_dir, tmp_path, capsys):
    png = str(tmp_path / "show.png")
    assert cli.main(["data", "show", "synthetic_music", "--data-dir", data_dir, "-n", "2",
                     "--png", png]) == 0
    out = capsys.readouterr().out
    assert "instrument=" in out and "tempo_bpm=" in out and os.path.getsize(png) > 1000
    model = str(tmp_path / "tok" / "spm.model")
    assert cli.main(["tokenizer", "train", "--data-dir", data_dir, "--out", model,
                     "--config.tokenizer.vocab_size=64", "--config.tokenizer.max_length=128"]) == 0
    assert os.path.exists(model)
    captured = capsys.readouterr()
    assert "caption tokens: median" in captured.out and "warning" not in captured.err
    # A length that cuts the captions is reported, with the length that keeps them whole.
    assert cli.main(["tokenizer", "train", "--data-dir", data_dir, "--out", model,
                     "--config.tokenizer.vocab_size=64", "--config.tokenizer.max_length=6"]) == 0
    err = capsys.readouterr().err
    assert "6 of 6 captions are longer than max_length=6" in err
    assert "raise --config.tokenizer.max_length to " in err


def test_rebuild_with_other_parameters_is_a_one_line_error(data_dir, capsys):
    code = cli.main(["data", "build", "synthetic_music", "--data-dir", data_dir,
                     "--config.data.num_train=7", "--config.data.num_test=2",
                     "--config.data.clip_seconds=0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ldm-jax: error:") and "num_train" in err
    assert len(err.splitlines()) == 1


def test_unknown_config_key_is_a_one_line_error(capsys):
    assert cli.main(["data", "build", "synthetic_music", "--data-dir", "/tmp/x",
                     "--config.data.num_trains=3"]) == 2
    assert "unknown config key 'data.num_trains'" in capsys.readouterr().err


def test_import_dac_encode_decode(fixtures_dir, tmp_path, capsys):
    out = str(tmp_path / "dac")
    assert cli.main(["codec", "import-dac", os.path.join(fixtures_dir, "dac", "tiny.pth"),
                     "--out", out]) == 0
    ref = np.load(os.path.join(fixtures_dir, "dac", "tiny_io.npz"))
    wav = str(tmp_path / "x.wav")
    sf.write(wav, ref["x"][0, 0], 16000, subtype="FLOAT")
    codes = str(tmp_path / "codes.npz")
    assert cli.main(["codec", "encode", wav, "-o", codes, "--codec", out]) == 0
    got = np.load(codes)
    np.testing.assert_array_equal(got["codes"], ref["codes"][0].T)
    y = str(tmp_path / "y.wav")
    assert cli.main(["codec", "decode", codes, "-o", y, "--codec", out]) == 0
    audio, sr = sf.read(y, dtype="float32")
    assert sr == 16000 and len(audio) == len(ref["y"][0, 0])
    # WAV is 16-bit: compare at that resolution.
    np.testing.assert_allclose(audio, ref["y"][0, 0], atol=2e-4)
    low = str(tmp_path / "y2.wav")
    assert cli.main(["codec", "decode", codes, "-o", low, "--codec", out,
                     "--n-codebooks", "2"]) == 0
    audio2, _ = sf.read(low, dtype="float32")
    np.testing.assert_allclose(audio2, ref["y_nq2"][0, 0], atol=2e-4)


def test_codec_commands_without_a_codec_say_what_to_run(tmp_path, capsys):
    assert cli.main(["codec", "eval", "--workdir", str(tmp_path)]) == 2
    assert "ldm-jax train codec" in capsys.readouterr().err


def test_malicious_checkpoint_is_refused(tmp_path, capsys):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil()))
    assert cli.main(["codec", "import-dac", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and not (tmp_path / "pwned").exists()


# Every numeric option of every command, with a value it refuses; each refusal is one line on
# stderr naming the option, before any work.
BAD_OPTIONS = [
    (["generate", "x", "--seconds", "-1"], "--seconds"),
    (["generate", "x", "--seconds", "0"], "--seconds"),
    (["generate", "x", "--steps", "0"], "--steps"),
    (["generate", "x", "--steps", "2.5"], "--steps"),
    (["generate", "x", "--cfg", "nan"], "--cfg"),
    (["generate", "x", "--seed", "-1"], "--seed"),
    (["generate", "x", "--strength", "0"], "--strength"),
    (["generate", "x", "--strength", "1.5"], "--strength"),
    (["generate", "x", "--inpaint-start", "-0.5"], "--inpaint-start"),
    (["generate", "x", "--inpaint-end", "inf"], "--inpaint-end"),
    (["generate", "x", "--control-start", "-1"], "--control-start"),
    (["generate", "x", "--control-end", "0"], "--control-end"),
    (["generate", "x", "--control-scale", "nan"], "--control-scale"),
    (["eval", "generation", "--num-prompts", "0"], "--num-prompts"),
    (["eval", "generation", "--steps", "many"], "--steps"),
    (["clap", "retrieve", "--query", "q", "--top", "0"], "--top"),
    (["codec", "encode", "a.wav", "-o", "b.npz", "--n-codebooks", "0"], "--n-codebooks"),
    (["codec", "decode", "b.npz", "-o", "a.wav", "--n-codebooks", "-2"], "--n-codebooks"),
    (["codec", "encode", "a.wav", "-o", "b.npz", "--bandwidth", "0"], "--bandwidth"),
    (["codec", "eval", "--n-codebooks", "0"], "--n-codebooks"),
    (["codec", "eval", "--max-clips", "-1"], "--max-clips"),
    (["data", "show", "synthetic_music", "-n", "0"], "--num"),
    (["run", "--num-processes", "0"], "--num-processes"),
    (["run", "--process-id", "-1"], "--process-id"),
    (["bench", "unet", "--batch", "0"], "--batch"),
    (["bench", "unet", "--repeats", "0"], "--repeats"),
    (["bench", "unet", "--peak-tflops", "-5"], "--peak-tflops"),
    (["bench", "sample", "--seconds", "0"], "--seconds"),
    (["bench", "sample", "--max-batch", "0"], "--max-batch"),
    (["bench", "sample", "--steps", "0"], "--steps"),
    (["bench", "unet", "--frame-rate", "nan"], "--frame-rate"),
    (["bench", "unet", "--peer-threads", "0"], "--peer-threads"),
    (["controls", "extract", "a.wav", "--json", "o.json", "--beats-per-bar", "0"],
     "--beats-per-bar"),
    (["controls", "extract", "a.wav", "--json", "o.json", "--frame-rate", "-50"],
     "--frame-rate"),
    (["eval", "controls", "--ceiling", "--max-clips", "-1"], "--max-clips"),
    (["generate", "x", "--window-seconds", "0"], "--window-seconds"),
    (["generate", "x", "--overlap-seconds", "-1"], "--overlap-seconds"),
    (["ditto", "x", "--seconds", "0"], "--seconds"),
    (["ditto", "x", "--seed", "-1"], "--seed"),
    (["ditto", "x", "--control-start", "-1"], "--control-start"),
    (["ditto", "x", "--control-end", "0"], "--control-end"),
    (["ditto", "x", "--loop-seconds", "0"], "--loop-seconds"),
    (["ditto", "x", "--outpaint-seconds", "nan"], "--outpaint-seconds"),
    (["ditto", "x", "--inpaint-start", "-1"], "--inpaint-start"),
    (["ditto", "x", "--inpaint-end", "0"], "--inpaint-end"),
    (["ditto", "x", "--iterations", "0"], "--iterations"),
    (["ditto", "x", "--lr", "-0.1"], "--lr"),
    (["ditto", "x", "--sampler-steps", "0"], "--sampler-steps"),
    (["ditto", "x", "--cfg", "inf"], "--cfg"),
    (["ditto", "x", "--tolerance", "-1"], "--tolerance"),
    (["ditto", "x", "--resample-steps", "-1"], "--resample-steps"),
    (["eval", "ditto", "--max-clips", "-1"], "--max-clips"),
    (["eval", "ditto", "--iterations", "0"], "--iterations"),
    (["eval", "ditto", "--lr", "0"], "--lr"),
    (["eval", "ditto", "--sampler-steps", "1.5"], "--sampler-steps"),
    (["eval", "ditto", "--resample-steps", "-2"], "--resample-steps"),
]


@pytest.mark.parametrize("argv,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_numeric_options_are_refused_in_one_line(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "error: argument" in err


def test_every_numeric_option_is_checked():
    """No option parses a bare int or float: each has a checking type (and a case above)."""
    import argparse

    parser = cli.build_parser()
    unchecked, seen = [], set()

    def walk(p, path):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif action.type in (int, float):
                unchecked.append(" ".join(path + [action.option_strings[-1]]))
            elif action.type is not None and action.option_strings:
                seen.add(action.option_strings[-1])

    walk(parser, [])
    assert not unchecked
    assert seen <= {option for _, option in BAD_OPTIONS}


def test_train_commands_run_the_chains_stage_runner(monkeypatch, tmp_path, capsys):
    from ldm_jax import chain, loop

    calls = []

    def runner(name, cfg, layout):
        calls.append((name, cfg, layout))
        return loop.TrainResult(state=None, step=3, history=[], preempted=name == "ldm")

    monkeypatch.setattr(chain, "train_stage", runner)
    w = str(tmp_path)
    assert cli.main(["train", "codec", "--config", "tiny", "--workdir", w]) == 0
    assert cli.main(["train", "ldm", "--workdir", w, "--latents", str(tmp_path / "z")]) == 0
    (codec, codec_cfg, codec_layout), (ldm, ldm_cfg, ldm_layout) = calls
    assert codec == "codec" and "model" in codec_cfg and codec_cfg.model.quantizer == "kl"
    assert codec_layout.data_dir == str(tmp_path / "data")
    assert ldm == "ldm" and ldm_layout.stage("latents") == str(tmp_path / "z")
    out = capsys.readouterr().out
    assert "codec: finished at step 3" in out and "ldm: stopped by a signal at step 3" in out
    assert cli.main(["train", "clap", "--workdir", w]) == 2
    assert "no tokenizer at" in capsys.readouterr().err
    assert cli.main(["train", "codec", "--config", "codec_tiny", "--workdir", w]) == 0
    assert calls[-1][1].model.quantizer == "dac_rvq"  # a stage experiment is its own config
