"""Multi-host coordination (`parallel`'s gathers, leader-only sections, sync-free checkpoint
reads, the chain's decisions): on one process, and as two JAX hosts (`hosts_main.py`)."""

import dataclasses
import importlib.util
import json
import os
import re
import sys

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ldm_jax import chain, checkpoint, parallel
from ldm_jax import config as config_lib
from ldm_jax.data import builders

HERE = os.path.dirname(__file__)
_spec = importlib.util.spec_from_file_location("toy_train_main",
                                               os.path.join(HERE, "toy_train_main.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _hosts_main():
    """hosts_main.py as a module, to run its checks on one process."""
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        "hosts_main", os.path.join(HERE, "hosts_main.py")))
    module.__spec__.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    out, work = root / "out", root / "work"
    argv = [sys.executable, os.path.join(HERE, "hosts_main.py"), "--out", str(out),
            "--workdir", str(work)]
    toy.finish(toy.start_cluster(argv, out, hosts=2), out, timeout=300)
    return [json.loads((out / f"host{i}.json").read_text()) for i in range(2)]


def test_gathers_broadcasts_and_shared_batches(two_hosts):
    for host in two_hosts:
        g = host["gather"]
        assert host["process_count"] == 2
        assert g["objects"] == [{"host": 0, "text": "xxx"}, {"host": 1, "text": "x" * 8}]
        assert g["broadcast"] == "from 0" and g["any"] is True
        # Batch k of 4 went to host k mod 2, and every host has all of them in order.
        assert g["batches"] == [[0, [0, 1]], [1, [2, 3]], [0, [4, 5]], [1, [6]]]
        assert g["host_local"] == {"sharded": True, "replicated": True}


def test_failures_on_process_0_reach_every_host(two_hosts):
    leader, other = (h["leader"] for h in two_hosts)
    assert leader["shared"] == other["shared"] == {"answer": 42}
    assert leader["failure"] == ["ValueError", "no such dataset\nsecond line"]
    assert other["failure"] == ["LeaderFailed",
                                "check failure failed on process 0: no such dataset"]
    # The chain's old codec_eval: a checkpoint manager opened by process 0 alone.
    assert leader["manager"][0] == "MultiHostError"
    assert "check manager runs on process 0 only" in leader["manager"][1]
    assert other["manager"][0] == "LeaderFailed" and "MultiHostError" not in other["manager"][1]


def test_process_0_reads_a_joint_checkpoint_alone(two_hosts):
    for host in two_hosts:
        assert host["read"] == {"step": 3, "equal": True, "type": "ndarray", "latest": 3}


def test_the_chain_follows_process_0_on_completeness(two_hosts):
    leader, other = (h["chain"] for h in two_hosts)
    # seen_done: complete for process 0 only, skipped by both; seen_missing: run by both.
    assert leader["ran"] == ["seen_missing", "alone"] and other["ran"] == ["seen_missing"]
    assert leader["summaries"]["seen_done"] == other["summaries"]["seen_done"] == \
        {"earlier": True}
    assert leader["summaries"]["alone"] == {"by": 0}


def test_clap_evaluation_reads_parameters_that_span_the_hosts(two_hosts):
    for host in two_hosts:
        metrics, reference = host["clap_eval"]["metrics"], host["clap_eval"]["reference"]
        assert set(metrics) == set(reference) and "zero_shot/instrument" in metrics
        for key, value in reference.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert two_hosts[0]["clap_eval"] == two_hosts[1]["clap_eval"]


def test_control_scores_are_shared_among_hosts_and_equal_one_hosts(two_hosts):
    from ldm_jax import controls
    from ldm_jax.controls import evaluate as control_eval
    cfg = controls.FeatureConfig(sample_rate=16000, frame_rate=50)
    hosts_main = _hosts_main()
    alone = control_eval.score_clips(hosts_main.controls_examples(), cfg,
                                     transform=lambda x: 0.5 * x, batch_size=1)
    alone = json.loads(json.dumps(alone))
    assert two_hosts[0]["controls_eval"] == two_hosts[1]["controls_eval"]
    for metric in control_eval.METRICS:
        got = two_hosts[0]["controls_eval"][metric]
        assert got["n"] == alone[metric]["n"]
        np.testing.assert_allclose(got["mean"], alone[metric]["mean"], rtol=1e-5)


def test_controlnet_trains_on_two_hosts_as_on_one(two_hosts, tmp_path):
    hosts_main = _hosts_main()
    alone = hosts_main.controlnet_run(str(tmp_path))
    assert two_hosts[0]["controlnet"] == two_hosts[1]["controlnet"]
    assert len(alone["losses"]) == 2
    np.testing.assert_allclose(two_hosts[0]["controlnet"]["losses"], alone["losses"], rtol=1e-4)
    np.testing.assert_allclose(two_hosts[0]["controlnet"]["norm"], alone["norm"], rtol=1e-4)


def test_ditto_shares_its_candidates_among_hosts_as_one_host_would(two_hosts, tmp_path):
    hosts_main = _hosts_main()
    alone = hosts_main.ditto_run(str(tmp_path))
    assert two_hosts[0]["ditto"] == two_hosts[1]["ditto"]
    assert len(alone["loss"]) == 4
    np.testing.assert_allclose(two_hosts[0]["ditto"]["loss"], alone["loss"], rtol=1e-4)
    assert all(b < a for a, b in zip(alone["initial"], alone["loss"]))


def test_an_evaluation_that_reads_arrays_spanning_hosts_says_so(two_hosts):
    for host in two_hosts:
        kind, message = host["unguarded"]
        assert kind == "MultiHostError"
        assert "toy: its evaluate function read device arrays that span several hosts" in message


# ------------------------------------------------------------------------------ one process

def test_leader_only_sections_refuse_every_multi_host_call(tmp_path):
    from jax.experimental import multihost_utils

    calls = {
        "the barrier 'b'": lambda: parallel.barrier("b"),
        "a gather across hosts": lambda: parallel.gather_objects(1),
        "a vote across hosts": lambda: parallel.any_host(True),
        "a device mesh": lambda: parallel.make_mesh(),
        "the checkpoint manager of": lambda: checkpoint.Checkpointer(str(tmp_path / "a")),
        # Third-party synchronisation, as orbax's managers and JAX's utilities do it.
        "an orbax barrier": lambda: ocp.CheckpointManager(
            str(tmp_path / "b"), options=ocp.CheckpointManagerOptions(create=True)),
        "jax's sync_global_devices (s)": lambda: multihost_utils.sync_global_devices("s"),
    }
    for what, call in calls.items():
        with parallel.leader_only("stage x"):
            with pytest.raises(parallel.MultiHostError, match=re.escape(
                    f"stage x runs on process 0 only, but reached {what}")):
                call()
    # Outside the section, and for managers of this process alone, nothing is refused.
    parallel.barrier("b")
    assert parallel.gather_objects(1) == [1]
    with parallel.leader_only("stage x"):
        checkpoint.Checkpointer(str(tmp_path / "c"), this_host_only=True).close()
        assert checkpoint.latest_step(str(tmp_path / "c")) is None
    multihost_utils.sync_global_devices("after")


def test_a_checkpoint_written_and_read_on_one_host_only(tmp_path):
    directory = str(tmp_path / "ck")
    with parallel.leader_only("import"):
        ck = checkpoint.Checkpointer(directory, this_host_only=True, model_config={"a": 1})
        ck.save(5, {"step": np.asarray(5), "params": {"w": np.ones((2, 3), np.float32)}})
        ck.close()
        state, step = checkpoint.read_state(directory)
    assert step == 5 and isinstance(state["params"]["w"], np.ndarray)
    np.testing.assert_array_equal(state["params"]["w"], np.ones((2, 3)))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        checkpoint.read_state(str(tmp_path / "none"))


def test_a_leader_only_stage_that_synchronises_fails_loudly(tmp_path):
    """The chain's old codec_eval: run on process 0 alone, it opened a checkpoint manager that
    waits for every host. On one host that passed unnoticed; now it names the stage."""
    def old_codec_eval(cfg, workdir):
        checkpoint.Checkpointer(os.path.join(workdir, "codec", "checkpoints")).latest_step()

    stages = [chain.Stage("codec_eval", (), (), lambda cfg, w: False, old_codec_eval)]
    with pytest.raises(parallel.MultiHostError,
                       match="stage codec_eval runs on process 0 only, but reached the "
                             "checkpoint manager"):
        chain.run_chain(stages, ml_collections.ConfigDict(), str(tmp_path),
                        print_fn=lambda *a: None)
    # Sharing its batches (as the real codec_eval does) is refused there as well.
    def shared_eval(cfg, workdir):
        parallel.map_batches(lambda rows: len(rows), 4, 2)

    stages = [chain.Stage("codec_eval", (), (), lambda cfg, w: False, shared_eval)]
    with pytest.raises(parallel.MultiHostError, match="reached work shared among the hosts"):
        chain.run_chain(stages, ml_collections.ConfigDict(), str(tmp_path / "2"),
                        print_fn=lambda *a: None)


def test_codec_eval_put_back_on_process_0_alone_fails_on_one_host(tmp_path):
    """The first stage that broke on two hosts: on process 0 alone it would now share its
    batches with hosts that are not there, which one host already refuses."""
    spec = importlib.util.spec_from_file_location(
        "generate_test", os.path.join(HERE, "diffusion", "test_generate.py"))
    generate_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate_test)
    generate_test.write_codec(tmp_path / "codec")
    cfg = config_lib.get_config("tiny", ["data.num_train=2", "data.num_test=2",
                                         "data.clip_seconds=0.25"])
    builders.build("synthetic_music", cfg.data, str(tmp_path / "data"), workers=1,
                   progress=False)
    (stage,) = [dataclasses.replace(s, all_hosts=False) for s in chain.default_stages()
                if s.name == "codec_eval"]
    with pytest.raises(parallel.MultiHostError, match="stage codec_eval runs on process 0 "
                       "only, but reached work shared among the hosts"):
        chain.run_chain([stage], cfg, str(tmp_path), print_fn=lambda *a: None)


def test_the_default_chain_runs_only_host_code_on_process_0_alone():
    alone = [s.name for s in chain.default_stages() if not s.all_hosts]
    assert alone == ["data", "tokenizer", "report"]
