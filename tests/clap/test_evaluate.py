"""CLAP evaluation: recall@k, and train -> load -> evaluate -> retrieve on a built dataset."""

import os

import numpy as np
import pytest

from ldm_jax.clap import evaluate as clap_eval
from ldm_jax.clap import model as clap_model
from ldm_jax.clap import train as clap_train
from ldm_jax.clap.text import Tokenizer
from ldm_jax.data import builders
from ldm_jax.workdir import Layout

SECONDS = 0.5


@pytest.fixture(scope="module")
def built(tmp_path_factory, clap_test_config):
    cfg = clap_test_config()
    with cfg.unlocked():
        cfg.train.steps = 1
        cfg.data.num_train, cfg.data.num_test, cfg.data.clip_seconds = 8, 8, SECONDS
    root = tmp_path_factory.mktemp("built")
    data_dir = str(root / "data")
    builders.build("synthetic_music", cfg.data, data_dir, workers=1, progress=False,
                   print_fn=None)
    train = builders.open_split(data_dir, "synthetic_music", "train")
    captions = [train[i]["caption"] for i in range(len(train))]
    tokenizer = Tokenizer.train(captions, vocab_size=96)
    tok_path = str(root / "spm.model")
    tokenizer.save(tok_path)
    return cfg, data_dir, tok_path, str(root / "clap")


def test_train_evaluate_retrieve_on_a_built_dataset(built):
    cfg, data_dir, tok_path, workdir = built
    where = Layout(root=os.path.dirname(workdir), data_dir=data_dir, tokenizer=tok_path)
    result = clap_train.train(cfg, where)
    assert where.stage("clap") == workdir
    assert result.step == 1 and os.listdir(where.logs("clap"))
    final = result.history[-1]
    assert final["eval/chance/recall_at_1"] == pytest.approx(1 / 8)
    assert 0.0 <= final["eval/zero_shot/instrument"] <= 1.0

    model = clap_model.ClapModel.load(workdir, batch_size=8)
    assert model.step == 1
    clips = [builders.show(data_dir, "synthetic_music", "test", 2)[i]["audio"] for i in (0, 1)]
    emb = model.embed_audio(clips + [clips[1][:1000]])
    assert emb.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.embed_audio(clips[0])[0], emb[0], atol=1e-5)
    states, mask = model.text_states(["a slow organ melody", ""])
    assert states.shape == (2, 16, 32) and mask.sum(1).tolist()[1] == 2
    np.testing.assert_allclose(np.linalg.norm(model.embed_text(["a bell"]), axis=1), 1.0,
                               rtol=1e-5)

    metrics = clap_eval.evaluate(None, workdir, data_dir, model=model)
    for key, value in final.items():
        if key.startswith("eval/"):
            assert metrics[key[len("eval/"):]] == pytest.approx(value, abs=1e-6)
    assert metrics["audio_to_text/recall_at_10"] == 1.0  # 10 > 8 candidates
    assert metrics["chance/zero_shot/instrument"] == pytest.approx(1 / 6)
    test = builders.open_split(data_dir, "synthetic_music", "test")
    keyed = sum(bool(test[i]["key"]) for i in range(len(test)))  # drum grooves have no key
    assert keyed and metrics["chance/zero_shot/key"] == pytest.approx(1 / 12)
    hits = clap_eval.retrieve(workdir, data_dir, "a slow organ melody", top=3, model=model)
    assert len(hits) == 3 and all(h[0].startswith("test_") for h in hits)
    assert [h[2] for h in hits] == sorted((h[2] for h in hits), reverse=True)
    assert clap_eval.retrieve(workdir, data_dir, "a slow organ melody", top=3,
                              model=model) == hits  # from the cached clip embeddings
    assert os.path.isfile(os.path.join(workdir, "embeddings_test.npz"))


def test_key_prompts_name_the_tonic_in_each_spelling_and_mode():
    assert clap_eval.key_prompts("Bb") == ["a piece in Bb major", "a piece in Bb minor",
                                           "a piece in B flat major", "a piece in B flat minor",
                                           "music in the key of Bb", "music in the key of B flat"]
    assert len(clap_eval.key_prompts("C")) == 3


def test_recall_at_k_counts_ranks_of_the_diagonal():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.2, 0.3, 0.1]])
    r = clap_eval.recall_at_k(sim, (1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
