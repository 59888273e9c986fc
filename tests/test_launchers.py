"""The launchers in launch/: printed commands (--dry-run), their control flow, shellcheck.

A dry run prints one shell command per line; the tests split each line as a shell would and check
the argument vectors. The control flow — retries after a TPU preemption, requeueing a SLURM job
that a signal stopped, stopping every local process when one fails — runs for real against small
stand-ins for `gcloud`, `srun`/`scontrol` and `ldm-jax` put first on PATH.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ldm_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_vm.sh", "slurm_gpu.sbatch", "local.sh")
CLUSTER_ENV = ("SLURM_", "LDM_JAX_", "TPU_WORKER_", "MEGASCALE_")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_ENV)}
    env.update(extra)
    return env


def launch(script, *args, env=None, timeout=60, check=True):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, env=env or clean_env(), timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def commands(stdout: str) -> list[list[str]]:
    """The printed commands as argument vectors (comments dropped)."""
    return [shlex.split(line) for line in stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def find(cmds, *prefix) -> list[str]:
    matches = [c for c in cmds if c[:len(prefix)] == list(prefix)]
    assert len(matches) == 1, f"expected one {' '.join(prefix)} command in {cmds}"
    return matches[0]


def option(cmd, name) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, f"{name} in {cmd}"
    return values[0]


def remote(cmd) -> str:
    return option(cmd, "--command")


def stub(bindir, name, body):
    """Writes an executable Python stand-in for a command; it logs its argv to bindir/calls."""
    path = os.path.join(bindir, name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport json, os, sys, time\n"
                f"with open({os.path.join(bindir, 'calls')!r}, 'a') as log:\n"
                f"    log.write(json.dumps([{name!r}] + sys.argv[1:]) + '\\n')\n"
                + textwrap.dedent(body))
    os.chmod(path, 0o755)


def calls(bindir) -> list[list[str]]:
    path = os.path.join(bindir, "calls")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_argument_errors(script):
    out = launch(script, "--help").stdout
    assert out.startswith("Usage:") and "--dry-run" in out and "--workdir" in out
    bad = launch(script, "--dry-run", "--workdir", "W", "--no-such-flag", check=False)
    assert bad.returncode == 2 and "unknown argument '--no-such-flag'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(["shellcheck", "--shell=bash", os.path.join(LAUNCH, script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tpu_vm_dry_run():
    out = launch("tpu_vm.sh", "--dry-run", "--name", "slice-a", "--zone", "us-east5-a",
                 "--accelerator-type", "v5p-32", "--project", "proj", "--spot",
                 "--experiment", "experiments/tiny.py", "--workdir", "gs://bucket/runs/a",
                 "--", "--stages", "codec", "--config.codec.train.steps=7").stdout
    cmds = commands(out)
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    create = find(cmds, *gcloud, "create")
    assert create[5] == "slice-a" and "--spot" in create
    assert option(create, "--zone") == "us-east5-a" and option(create, "--project") == "proj"
    assert option(create, "--accelerator-type") == "v5p-32"
    assert option(create, "--version") == "v2-alpha-tpuv5"
    tar = find(cmds, "tar")
    assert tar[tar.index("-C") + 1] == REPO and "--exclude=.git" in tar
    scp = find(cmds, *gcloud, "scp")
    assert scp[5] == tar[tar.index("-czf") + 1] and scp[6] == "slice-a:ldm_jax.tar.gz"
    assert "--worker=all" in scp
    install, run = [c for c in cmds if c[:5] == gcloud + ["ssh"]]
    for cmd in (install, run):
        assert cmd[5] == "slice-a" and "--worker=all" in cmd
        assert option(cmd, "--zone") == "us-east5-a" and option(cmd, "--project") == "proj"
    steps = [shlex.split(s) for s in remote(install).split(";")]
    assert ["python3", "-m", "pip", "install", "-U", "jax[tpu]"] in steps
    assert ["python3", "-m", "pip", "install", "-e", "~/ldm_jax", "gcsfs"] in steps
    assert "tar -xzf ~/ldm_jax.tar.gz -C ~/ldm_jax" in remote(install)
    command = remote(run)
    assert "LDM_JAX_DISTRIBUTED=auto" in command and "set -o pipefail" in command
    ldm = shlex.split(command.split("&&", 1)[1].split("2>&1")[0])
    assert ldm == ["ldm-jax", "run", "experiments/tiny.py", "--workdir", "gs://bucket/runs/a",
                   "--stages", "codec", "--config.codec.train.steps=7"]
    delete = find(cmds, *gcloud, "delete")
    assert delete[5] == "slice-a" and "--quiet" in delete
    order = [cmds.index(c) for c in (tar, create, scp, install, run, delete)]
    assert order == sorted(order)


def test_tpu_vm_clone_and_default_versions():
    out = launch("tpu_vm.sh", "--dry-run", "--workdir", "gs://b/w", "--repo",
                 "https://example.org/ldm_jax.git", "--ref", "v1").stdout
    cmds = commands(out)
    assert not [c for c in cmds if c[0] == "tar" or "scp" in c]
    create = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "create")
    assert option(create, "--accelerator-type") == "v4-32"
    assert option(create, "--version") == "tpu-ubuntu2204-base" and "--spot" not in create
    install = next(c for c in cmds if "ssh" in c and "pip" in remote(c))
    assert ("git clone --depth 1 --branch v1 https://example.org/ldm_jax.git ~/ldm_jax"
            in remote(install))
    missing = launch("tpu_vm.sh", "--dry-run", check=False)
    assert missing.returncode == 2 and "--workdir" in missing.stderr


def test_tpu_vm_recreates_a_preempted_slice_and_always_deletes(tmp_path):
    bindir = str(tmp_path)
    # The first run dies with the slice (a spot preemption); the second one succeeds.
    stub(bindir, "gcloud", """
        args = sys.argv[1:]
        log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls")
        if args[3] == "ssh" and any("ldm-jax run" in a for a in args):
            runs = sum(1 for line in open(log) if "ldm-jax run" in line)
            sys.exit(255 if runs == 1 else 0)
        if args[3] == "describe":
            print("PREEMPTED")
        """)
    env = clean_env(PATH=bindir + os.pathsep + os.environ["PATH"])
    proc = launch("tpu_vm.sh", "--name", "s", "--zone", "z", "--workdir", "gs://b/w",
                  "--repo", "https://example.org/r.git", "--retries", "1", env=env)
    verbs = [c[4] for c in calls(bindir)]
    assert verbs == ["create", "ssh", "ssh", "describe", "delete", "create", "ssh", "ssh",
                     "delete"], proc.stderr
    assert "recreating it and resuming (retry 1)" in proc.stderr

    # Without retries a failed run ends the script with an error, and the slice still goes.
    os.remove(os.path.join(bindir, "calls"))
    proc = launch("tpu_vm.sh", "--name", "s", "--zone", "z", "--workdir", "gs://b/w",
                  "--repo", "https://example.org/r.git", env=env, check=False)
    assert proc.returncode == 1 and "the run failed (slice state: PREEMPTED)" in proc.stderr
    assert [c[4] for c in calls(bindir)] == ["create", "ssh", "ssh", "describe", "delete"]


def test_slurm_dry_run_outside_a_job_submits_itself():
    out = launch("slurm_gpu.sbatch", "--dry-run", "--nodes", "4", "--gpus-per-node", "4",
                 "--partition", "gpu", "--workdir", "/shared/runs/a", "--venv", "/opt/venv",
                 "--", "--stages", "codec").stdout
    cmds = commands(out)
    sbatch = find(cmds, "sbatch")
    assert option(sbatch, "--nodes") == "4" and option(sbatch, "--ntasks-per-node") == "4"
    assert option(sbatch, "--gpus-per-node") == "4" and option(sbatch, "--partition") == "gpu"
    script = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
    assert sbatch[sbatch.index(script) + 1:] == [
        "--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu", "--workdir",
        "/shared/runs/a", "--venv", "/opt/venv", "--", "--stages", "codec"]
    assert ["source", "/opt/venv/bin/activate"] in cmds
    srun = find(cmds, "srun")
    assert srun == ["srun", "--nodes=4", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
                    "ldm-jax", "run", "tiny", "--workdir", "/shared/runs/a", "--stages", "codec"]
    unset = find(cmds, "unset")
    assert "LDM_JAX_COORDINATOR" in unset  # SLURM's variables drive jax.distributed
    with open(script) as f:
        header = f.read()
    assert "#SBATCH --signal=TERM@" in header and "#SBATCH --requeue" in header


def test_slurm_dry_run_inside_a_job_takes_the_allocation():
    env = clean_env(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="3", SLURM_NTASKS_PER_NODE="2(x3)",
                    SLURM_SUBMIT_DIR="/home/u/ldm_jax")
    cmds = commands(launch("slurm_gpu.sbatch", "--dry-run", "--workdir", "/w", env=env).stdout)
    assert not [c for c in cmds if c[0] == "sbatch"]
    assert ["cd", "/home/u/ldm_jax"] in cmds
    assert find(cmds, "srun")[:3] == ["srun", "--nodes=3", "--ntasks-per-node=2"]


def test_slurm_requeues_a_job_that_a_signal_stopped(tmp_path):
    bindir = str(tmp_path)
    stub(bindir, "srun", "sys.exit(int(os.environ['STUB_EXIT']))\n")
    stub(bindir, "scontrol", "")
    for code, requeued in ((130, True), (0, False), (1, False)):
        if os.path.exists(os.path.join(bindir, "calls")):
            os.remove(os.path.join(bindir, "calls"))
        env = clean_env(PATH=bindir + os.pathsep + os.environ["PATH"], STUB_EXIT=str(code),
                        SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8",
                        SLURM_SUBMIT_DIR=REPO, LDM_JAX_COORDINATOR="stale:1")
        proc = launch("slurm_gpu.sbatch", "--workdir", "/w", env=env, check=False)
        assert proc.returncode == code
        logged = calls(bindir)
        assert logged[0] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                             "ldm-jax", "run", "tiny", "--workdir", "/w"]
        assert (["scontrol", "requeue", "42"] in logged) == requeued


def test_local_dry_run():
    assert commands(launch("local.sh", "--dry-run").stdout) == [
        ["ldm-jax", "run", "tiny", "--workdir", "runs/tiny"]]
    out = launch("local.sh", "--dry-run", "--processes", "2", "--cpu-devices", "4",
                 "--port", "4567", "--experiment", "experiments/tiny.py", "--workdir", "W",
                 "--", "--stages", "codec").stdout
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0] == "mkdir -p W/logs/launch" and lines[-1] == "wait"
    for index, line in zip((1, 0), lines[1:3]):
        argv = shlex.split(line)
        cut = argv.index("ldm-jax")
        assert argv[0] == "env" and sorted(argv[1:cut]) == sorted([
            "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "LDM_JAX_COORDINATOR=127.0.0.1:4567", "LDM_JAX_NUM_PROCESSES=2",
            f"LDM_JAX_PROCESS_ID={index}"])
        assert argv[cut:cut + 7] == ["ldm-jax", "run", "experiments/tiny.py", "--workdir", "W",
                                     "--stages", "codec"]
        assert argv[cut + 7:] == (["2>&1", "|", "tee", "W/logs/launch/process_0.log"]
                                  if index == 0 else
                                  [">", "W/logs/launch/process_1.log", "2>&1", "&"])


def test_local_processes_get_their_ranks_and_fail_together(tmp_path):
    bindir = str(tmp_path / "bin")
    os.makedirs(bindir)
    # Process 1 fails at once; process 0 would run for a minute unless it is stopped.
    stub(bindir, "ldm-jax", """
        import signal
        rank = os.environ["LDM_JAX_PROCESS_ID"]
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "env" + rank),
                  "w") as f:
            json.dump({k: v for k, v in os.environ.items() if k.startswith("LDM_JAX_")}, f)
        if rank == "1":
            sys.exit(3)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        time.sleep(60)
        """)
    env = clean_env(PATH=bindir + os.pathsep + os.environ["PATH"])
    start = time.monotonic()
    proc = launch("local.sh", "--processes", "2", "--port", "4568", "--workdir",
                  str(tmp_path / "W"), env=env, check=False)
    assert proc.returncode == 3 and "a process exited with 3" in proc.stderr
    assert time.monotonic() - start < 50  # process 0 was stopped, not waited for
    for rank in (0, 1):
        with open(os.path.join(bindir, f"env{rank}")) as f:
            assert json.load(f) == {"LDM_JAX_COORDINATOR": "127.0.0.1:4568",
                                    "LDM_JAX_NUM_PROCESSES": "2",
                                    "LDM_JAX_PROCESS_ID": str(rank)}
    assert os.path.exists(tmp_path / "W" / "logs" / "launch" / "process_1.log")


def test_local_forwards_sigterm_to_every_process(tmp_path):
    bindir = str(tmp_path / "bin")
    os.makedirs(bindir)
    stub(bindir, "ldm-jax", """
        import signal
        rank = os.environ["LDM_JAX_PROCESS_ID"]
        here = os.path.dirname(os.path.abspath(__file__))

        def stop(*args):
            open(os.path.join(here, "stopped" + rank), "w").close()
            sys.exit(0)

        signal.signal(signal.SIGTERM, stop)
        open(os.path.join(here, "ready" + rank), "w").close()
        time.sleep(60)
        """)
    env = clean_env(PATH=bindir + os.pathsep + os.environ["PATH"])
    proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "local.sh"), "--processes", "3",
                             "--workdir", str(tmp_path / "W")], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not all(os.path.exists(os.path.join(bindir, f"ready{r}")) for r in range(3)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert all(os.path.exists(os.path.join(bindir, f"stopped{r}")) for r in range(3))


def test_distributed_start_modes(monkeypatch):
    """What each launcher relies on: which environments start jax.distributed, and how."""
    started = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize",
                        lambda **kw: started.append(kw))
    monkeypatch.setattr(parallel.jax.config, "update", lambda *a: None)
    for key in [k for k in os.environ if k.startswith(CLUSTER_ENV)]:
        monkeypatch.delenv(key)
    assert parallel.initialize_distributed() is False and started == []
    monkeypatch.setenv("LDM_JAX_DISTRIBUTED", "auto")  # tpu_vm.sh: a TPU VM slice
    assert parallel.initialize_distributed() is True and started[-1] == {}
    monkeypatch.delenv("LDM_JAX_DISTRIBUTED")
    monkeypatch.setenv("SLURM_JOB_ID", "1")  # slurm_gpu.sbatch: srun with several tasks
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert parallel.initialize_distributed() is True and started[-1] == {}
    monkeypatch.setenv("LDM_JAX_COORDINATOR", "127.0.0.1:9")  # local.sh --processes N
    monkeypatch.setenv("LDM_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("LDM_JAX_PROCESS_ID", "1")
    assert parallel.initialize_distributed() is True
    assert started[-1] == {"coordinator_address": "127.0.0.1:9", "num_processes": 2,
                           "process_id": 1}
