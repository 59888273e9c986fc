"""Preemption and crashes: SIGTERM, `kill -9`, a crash in the middle of a checkpoint write, NaN.

The training runs are separate processes (`toy_train_main.py`, the toy regression task through
`loop.train` and the grain pipeline) so that signals and kills hit a real process; every restart
must end with params bitwise equal to an uninterrupted run and must read exactly the batches that
run read.
"""

import importlib.util
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from ldm_jax import cli, loop, parallel
from ldm_jax.checkpoint import Checkpointer

_spec = importlib.util.spec_from_file_location(
    "toy_train_main", os.path.join(os.path.dirname(__file__), "toy_train_main.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

STEPS = 12
TMP = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (summary, params, workdir); checkpoints every 3 steps, 3 kept."""
    root = tmp_path_factory.mktemp("uninterrupted")
    toy.finish(toy.start(root / "work", root / "out", STEPS), root / "out")
    summary, params = toy.result(root / "out")
    return summary, params, root / "work"


def steps_on_disk(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def resume_and_compare(workdir, out, reference, earlier_ids: list[int], from_step: int):
    """Restarts the run in `workdir` and checks it against the uninterrupted one."""
    toy.finish(toy.start(workdir, out, STEPS), out)
    summary, params = toy.result(out)
    full, full_params, _ = reference
    assert summary["step"] == STEPS and summary["steps_run"] == STEPS - from_step
    assert earlier_ids + summary["ids"] == full["ids"]
    for key in full_params:
        np.testing.assert_array_equal(params[key], full_params[key])


def test_sigterm_saves_the_current_step_and_resume_is_exact(reference, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    # No periodic checkpoints: the only one is what the signal makes the loop write.
    procs = toy.start(work, out, STEPS, sleep=0.1, ckpt_every=0)
    toy.wait_for_progress(procs, out, 3)
    procs[0].send_signal(signal.SIGTERM)
    toy.finish(procs, out)  # exit code 0
    stopped, _ = toy.result(out)
    step = stopped["step"]
    assert stopped["preempted"] and 0 < step < STEPS, toy.logs(out, 1)
    assert "SIGTERM received, saving step" in toy.logs(out, 1)
    assert steps_on_disk(work) == [str(step), "model_config.json"]
    resume_and_compare(work, tmp_path / "out2", reference, stopped["ids"], step)


def test_kill_9_resumes_from_the_last_checkpoint_exactly(reference, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    procs = toy.start(work, out, STEPS, sleep=0.1, ckpt_every=3)
    toy.wait_for_progress(procs, out, 5)  # the step-3 checkpoint is complete by now
    procs[0].kill()
    assert toy.wait(procs) == [-signal.SIGKILL]
    ck = Checkpointer(str(work / "checkpoints"))
    last = ck.latest_step()
    ck.close()
    assert last is not None and 3 <= last < STEPS and last % 3 == 0
    # The killed run logged nothing of its own about what it read; the uninterrupted run's
    # first `last` batches are what the checkpoint's iterator position stands for.
    resume_and_compare(work, tmp_path / "out2", reference,
                       reference[0]["ids"][:last * toy.GLOBAL_BATCH], last)


def test_checkpoint_interrupted_mid_write_is_ignored(reference, tmp_path):
    """A kill during a save leaves orbax's temporary directory; restore takes the step before."""
    work = tmp_path / "work"
    shutil.copytree(reference[2], work)
    assert steps_on_disk(work) == ["12", "6", "9", "model_config.json"]
    # What a kill while writing step 12 leaves: the unrenamed temporary directory, without
    # the files orbax writes last.
    ckpt = work / "checkpoints"
    os.rename(ckpt / "12", ckpt / f"12{TMP}")
    for name in ("_CHECKPOINT_METADATA", "commit_success.txt"):
        os.remove(ckpt / f"12{TMP}" / name)
    shutil.rmtree(ckpt / f"12{TMP}" / "data")
    ck = Checkpointer(str(ckpt))
    assert ck.latest_step() == 9
    ck.close()
    resume_and_compare(work, tmp_path / "out", reference,
                       reference[0]["ids"][:9 * toy.GLOBAL_BATCH], 9)
    # Saving step 12 again replaced the stale temporary directory.
    assert steps_on_disk(work) == ["12", "6", "9", "model_config.json"]


def test_nan_keeps_the_last_good_checkpoint_and_training_goes_on_from_it(tmp_path):
    mesh = parallel.make_mesh()
    batch = parallel.per_host_batch(toy.GLOBAL_BATCH, mesh)
    kwargs = dict(workdir=str(tmp_path), num_steps=STEPS, mesh=mesh,
                  checkpoint_cfg={"every_steps": 3, "keep": 3},
                  log_cfg={"every_steps": 2, "progress": False})
    with pytest.raises(loop.NonFiniteLoss, match=r"loss became nan at step 8; .* last good "
                                                 r"checkpoint is step 6"):
        loop.train(toy.make_task(poison_at=8), toy.make_iterator(batch), **kwargs)
    # Nothing from the poisoned step or after it was written.
    assert steps_on_disk(tmp_path) == ["3", "6", "model_config.json"]
    assert [r["step"] for r in loop.read_history(str(tmp_path))] == [2, 4, 6]
    result = loop.train(toy.make_task(), toy.make_iterator(batch), **kwargs)
    assert result.step == STEPS and np.isfinite(result.history[-1]["train/loss"])
    params = jax.device_get(result.state["params"])
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_nan_through_the_cli_is_one_line(monkeypatch, tmp_path, capsys):
    from ldm_jax.codec import train as codec_train

    def diverge(*args, **kwargs):
        raise loop.NonFiniteLoss("codec: loss became nan at step 7; stopped, the last good "
                                 "checkpoint is step 5 in W/codec/checkpoints")

    monkeypatch.setattr(codec_train, "train", diverge)
    code = cli.main(["train", "codec", "--workdir", str(tmp_path), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("ldm-jax: error: codec: loss became nan at step 7")
