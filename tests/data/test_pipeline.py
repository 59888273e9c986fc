"""Tests for the grain pipeline: resume exactness, per-host shards, crop determinism, eval mode."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ldm_jax.data import pipeline, tfds_common

SR = 100  # samples per second: crops of 0.2 s are 20 samples


def data_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(sample_rate=SR, channels=1, crop_seconds=0.2,
                                         shuffle_seed=0, worker_count=0, worker_buffer_size=2))
    cfg.update(overrides)
    return cfg


def make_examples(n=21):
    rng = np.random.default_rng(0)
    # Lengths 15..45 samples: some clips are shorter than the 20-sample crop and get padded.
    return [{"audio": rng.standard_normal(15 + (i * 7) % 31).astype(np.float32),
             "caption": f"clip {i}", "id": f"id{i:03d}", "tempo_bpm": np.float32(60 + i)}
            for i in range(n)]


@pytest.fixture(scope="module")
def examples():
    return make_examples()


@pytest.fixture(scope="module")
def tfds_source(tmp_path_factory):
    """The same examples written as an ArrayRecord TFDS dataset and opened with open_split."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    items = make_examples()
    features = {"audio": tfds_common.audio_feature(None), "caption": tfds.features.Text(),
                "id": tfds.features.Text(), "tempo_bpm": tfds.features.Scalar(dtype=np.float32)}
    split = tfds_common.SplitSpec(len(items), lambda: ((e["id"], e) for e in items))
    tfds_common.write_dataset("toy_clips", data_dir, features=features, splits={"train": split},
                              params={"n": len(items)}, progress=False)
    return tfds_common.open_split(data_dir, "toy_clips", "train")


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and x[key].shape == y[key].shape, key
            assert np.array_equal(x[key], y[key]), key


def test_batch_layout(examples):
    it = pipeline.make_iterator(examples, data_cfg(channels=2), batch_size=4, seed=1,
                                process_index=0, process_count=1,
                                fields=("audio", "caption", "tempo_bpm"))
    batch = next(it)
    assert batch["audio"].shape == (4, 20, 2) and batch["audio"].dtype == np.float32
    assert batch["audio_mask"].shape == (4, 20) and batch["audio_mask"].dtype == bool
    assert batch["audio_length"].dtype == np.int32
    np.testing.assert_array_equal(batch["audio_mask"].sum(1), batch["audio_length"])
    # Mono clips are repeated onto both channels; padding is zeros.
    np.testing.assert_array_equal(batch["audio"][..., 0], batch["audio"][..., 1])
    assert np.all(batch["audio"][~batch["audio_mask"]] == 0)
    assert batch["caption"].shape == (4,) and batch["caption"][0].startswith("clip ")
    assert batch["tempo_bpm"].dtype == np.float32


def test_crops_come_from_the_clip_and_are_deterministic(examples):
    by_caption = {e["caption"]: e["audio"] for e in examples}
    kwargs = dict(batch_size=3, seed=5, process_index=0, process_count=1)
    first = take(pipeline.make_iterator(examples, data_cfg(), **kwargs), 10)
    again = take(pipeline.make_iterator(examples, data_cfg(), **kwargs), 10)
    assert_same_batches(first, again)
    other_seed = take(pipeline.make_iterator(examples, data_cfg(), **{**kwargs, "seed": 6}), 10)
    assert not all(np.array_equal(a["audio"], b["audio"]) for a, b in zip(first, other_seed))
    offsets = {}
    for batch in first:
        for audio, n, caption in zip(batch["audio"][..., 0], batch["audio_length"],
                                     batch["caption"]):
            clip = by_caption[str(caption)]
            starts = [s for s in range(len(clip) - n + 1)
                      if np.array_equal(clip[s:s + n], audio[:n])]
            assert starts, caption
            offsets.setdefault(str(caption), set()).add(starts[0])
    # 30 clips over 10 batches of a 21-clip set: later epochs crop the long clips elsewhere.
    assert any(len(v) > 1 for v in offsets.values())


def test_eval_hosts_take_whole_batches_in_turn(examples):
    one = [list(b["id"]) for b in pipeline.make_iterator(
        examples, data_cfg(), batch_size=2, seed=0, train=False, process_index=0,
        process_count=1, fields=("id",))]
    hosts = [[list(b["id"]) for b in pipeline.make_iterator(
        examples, data_cfg(), batch_size=2, seed=0, train=False, process_index=index,
        process_count=3, fields=("id",))] for index in range(3)]
    assert [len(h) for h in hosts] == [4, 4, 3]  # 11 batches of the 21 examples
    assert [hosts[k % 3][k // 3] for k in range(11)] == one


@pytest.mark.parametrize("hosts", [2, 3])
def test_training_global_batches_do_not_depend_on_the_host_count(examples, hosts):
    kwargs = dict(seed=3, fields=("id", "audio"))
    single = take(pipeline.make_iterator(examples, data_cfg(), batch_size=2 * hosts,
                                         process_index=0, process_count=1, **kwargs), 6)
    parts = [take(pipeline.make_iterator(examples, data_cfg(), batch_size=2, process_index=i,
                                         process_count=hosts, **kwargs), 6)
             for i in range(hosts)]
    for step, batch in enumerate(single):
        for key in ("id", "audio"):
            joined = np.concatenate([parts[i][step][key] for i in range(hosts)])
            np.testing.assert_array_equal(joined, batch[key])
    # Within a step the hosts read disjoint examples (the set has more than one batch).
    assert not set(parts[0][0]["id"]) & set(parts[1][0]["id"])


def test_eval_mode_is_ordered_center_cropped_and_keeps_the_remainder(examples):
    # No process arguments: this single JAX process reads everything.
    it = pipeline.make_iterator(examples, data_cfg(), batch_size=4, seed=0, train=False)
    batches = list(it)
    assert [len(b["caption"]) for b in batches] == [4, 4, 4, 4, 4, 1]
    audio = batches[0]["audio"][1, :, 0]
    clip = examples[1]["audio"]  # 22 samples: the centre 20 start at 1
    np.testing.assert_array_equal(audio, clip[1:21])


def test_full_clips_pad_to_the_longest_of_the_batch(examples):
    it = pipeline.make_iterator(examples, data_cfg(), batch_size=3, seed=0, train=False,
                                process_index=0, process_count=1, crop_seconds=0)
    batch = next(it)
    lengths = [len(examples[i]["audio"]) for i in range(3)]
    assert batch["audio"].shape == (3, max(lengths), 1)
    np.testing.assert_array_equal(batch["audio_length"], lengths)
    np.testing.assert_array_equal(batch["audio"][2, :lengths[2], 0], examples[2]["audio"])


def check_resume(source, cfg, n=5, k=4):
    kwargs = dict(batch_size=4, seed=7, process_index=0, process_count=1,
                  fields=("audio", "caption", "id"))
    # Worker processes change where batches are made, not which batches come out.
    reference = take(pipeline.make_iterator(source, cfg, worker_count=0, **kwargs), n + k)
    it = pipeline.make_iterator(source, cfg, **kwargs)
    take(it, n)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, k)
    if hasattr(it, "close"):
        it.close()
    resumed = pipeline.make_iterator(source, cfg, **kwargs)
    resumed.set_state(state)
    got = take(resumed, k)
    if hasattr(resumed, "close"):
        resumed.close()
    assert_same_batches(expected, got)
    assert_same_batches(reference[n:], got)
    # n + k batches of 4 cross the 21-example epoch boundary, so reshuffled epochs resume too.
    assert (n + k) * 4 > len(source)


def test_resume_is_exact(examples):
    check_resume(examples, data_cfg())


def test_resume_is_exact_from_tfds_with_workers(tfds_source):
    example = tfds_source[0]
    assert isinstance(example["caption"], str) and example["tempo_bpm"].dtype == np.float32
    check_resume(tfds_source, data_cfg(worker_count=2, worker_buffer_size=1))


def test_user_errors(examples):
    with pytest.raises(tfds_common.DataError, match="no field lyrics"):
        pipeline.make_dataset(examples, data_cfg(), batch_size=2, seed=0, process_index=0,
                              process_count=1, fields=("audio", "lyrics"))
    with pytest.raises(tfds_common.DataError, match="has 2 channels but data.channels=1"):
        stereo = [{"audio": np.zeros((30, 2), np.float32), "caption": ""}]
        pipeline.make_dataset(stereo, data_cfg(), batch_size=1, seed=0, process_index=0,
                              process_count=1)
    with pytest.raises(tfds_common.DataError, match="host 2 of 3 gets no batch"):
        pipeline.make_dataset(examples[:2], data_cfg(), batch_size=2, seed=0, process_index=2,
                              process_count=3, num_epochs=1)
