"""Two processes as two JAX hosts (loopback coordinator, gloo collectives on CPU).

Each host reads its half of every global batch through the grain pipeline, the hosts train the
toy task of `toy_train_main.py` together through `loop.train`, write orbax checkpoints jointly
(one array checkpoint, one data-iterator file per host), stop together when one host gets
SIGTERM, and a second launch resumes to the same params as an uninterrupted two-host run.
"""

import importlib.util
import os
import signal

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "toy_train_main", os.path.join(os.path.dirname(__file__), "toy_train_main.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

HOSTS = 2
STEPS = 12


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_full")
    out = root / "out"
    toy.finish(toy.start(root / "work", out, STEPS, hosts=HOSTS), out)
    return [toy.result(out, i) for i in range(HOSTS)]


def test_hosts_read_halves_of_one_hosts_global_batches_and_agree(uninterrupted):
    (first, params0), (second, params1) = uninterrupted
    for index, summary in enumerate((first, second)):
        assert summary["process_index"] == index and summary["process_count"] == HOSTS
        assert summary["device_count"] == 4 and summary["step"] == STEPS
    per_host = toy.GLOBAL_BATCH // HOSTS
    assert len(first["ids"]) == len(second["ids"]) == STEPS * per_host
    # Step s trains on what one host reading global batches reads at step s: host 0 the first
    # half, host 1 the second, so the two never read the same example in one step.
    single = toy.make_iterator(toy.GLOBAL_BATCH)
    for step in range(STEPS):
        part = slice(step * per_host, (step + 1) * per_host)
        assert first["ids"][part] + second["ids"][part] == list(next(single)["id"])
    # The first epoch's steps cover the dataset exactly once.
    epoch = toy.NUM_EXAMPLES // HOSTS
    assert sorted(first["ids"][:epoch] + second["ids"][:epoch]) == list(range(toy.NUM_EXAMPLES))
    for key in params0:
        np.testing.assert_array_equal(params0[key], params1[key])


def test_sigterm_on_one_host_stops_both_and_resume_is_exact(uninterrupted, tmp_path):
    work, out1, out2 = tmp_path / "work", tmp_path / "out1", tmp_path / "out2"
    # No periodic checkpoints: the only one is what the signal makes the hosts write.
    procs = toy.start(work, out1, STEPS, hosts=HOSTS, sleep=0.15, log_every=2, ckpt_every=0)
    toy.wait_for_progress(procs, out1, 3, index=1)
    procs[1].send_signal(signal.SIGTERM)  # host 0 learns of it at the next log step
    toy.finish(procs, out1)
    stopped = [toy.result(out1, i)[0] for i in range(HOSTS)]
    step = stopped[0]["step"]
    assert all(s["preempted"] for s in stopped), toy.logs(out1, HOSTS)
    assert stopped[1]["step"] == step and 0 < step < STEPS and step % 2 == 0
    assert sorted(n for n in os.listdir(work / "checkpoints") if n.isdigit()) == [str(step)]
    saved = work / "checkpoints" / str(step)
    assert sorted(os.listdir(saved / "data")) == ["commit_success.txt", "process_0-of-2.json",
                                                  "process_1-of-2.json"]

    toy.finish(toy.start(work, out2, STEPS, hosts=HOSTS), out2)
    for index in range(HOSTS):
        resumed, params = toy.result(out2, index)
        full, full_params = uninterrupted[index]
        assert resumed["step"] == STEPS and resumed["steps_run"] == STEPS - step
        # The resumed host reads exactly the batches the uninterrupted one read after `step`.
        assert stopped[index]["ids"] + resumed["ids"] == full["ids"]
        for key in full_params:
            np.testing.assert_array_equal(params[key], full_params[key])
