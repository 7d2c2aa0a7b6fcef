"""One run per folder (`checkpoints.workdir_lock`): a second training run, negatives run or toy-world pretraining
on a folder in use is refused in one line naming the process and host that hold it; a dead run's lock is taken
over."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nsync_jax import checkpoints, distributed, negatives
from nsync_jax.cli import main
from nsync_jax.errors import UserError
from nsync_jax.pipeline import load_pipeline
from nsync_jax.sampling import SampleSettings
from nsync_jax.toyworld import pretrain

from conftest import CONFIG

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


@pytest.fixture
def live_pid():
    """The id of a live process that is not this one (as another run holding a folder would be)."""
    process = subprocess.Popen(["sleep", "300"])
    yield process.pid
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def hold(folder: Path, pid: int, host: str = HOST) -> dict:
    """Writes `folder/.lock` as the run `pid` on `host` would have."""
    holder = {"pid": pid, "host": host, "started": "2024-01-02 03:04:05"}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(json.dumps(holder))
    return holder


def refusal(folder: Path, what: str = "training run") -> str:
    with pytest.raises(UserError) as error:
        with checkpoints.workdir_lock(folder, what):
            pytest.fail("the lock was taken")
    return str(error.value)


def test_lock_is_held_for_the_block_and_given_back_on_errors_too(tmp_path):
    folder = tmp_path / "new" / "work"
    with checkpoints.workdir_lock(folder, "training run"):
        holder = json.loads((folder / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == HOST and holder["started"]
        # This process is alive: a second run in it is refused like any other.
        assert f"process {os.getpid()} on {HOST}" in refusal(folder)
    assert sorted(p.name for p in folder.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with checkpoints.workdir_lock(folder, "training run"):
            raise RuntimeError("boom")
    assert not (folder / ".lock").exists()


def test_a_folder_a_live_process_holds_is_refused_in_one_line(tmp_path, live_pid):
    holder = hold(tmp_path, live_pid)
    message = refusal(tmp_path)
    assert message == (f"{tmp_path}: another training run is using it (process {live_pid} on {HOST}, since "
                       "2024-01-02 03:04:05); wait for it to end or use another folder")
    assert json.loads((tmp_path / ".lock").read_text()) == holder  # left to its holder
    # Held from another host, even by a process id that is dead here: its liveness cannot be checked.
    hold(tmp_path, dead_pid(), host="other-host")
    assert "on other-host" in refusal(tmp_path)


@pytest.mark.parametrize("stale", ["dead", "garbage", "empty"])
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, stale):
    if stale == "dead":
        hold(tmp_path, dead_pid())
    else:
        (tmp_path / ".lock").write_text("{not json" if stale == "garbage" else "")
    with checkpoints.workdir_lock(tmp_path, "training run"):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_only_process_0_takes_the_lock(tmp_path, live_pid, monkeypatch):
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    with checkpoints.workdir_lock(tmp_path / "work", "training run"):
        assert not (tmp_path / "work").exists()
    holder = hold(tmp_path, live_pid)
    with checkpoints.workdir_lock(tmp_path, "training run"):  # process 0 decides, and here it is not refused
        pass
    assert json.loads((tmp_path / ".lock").read_text()) == holder


def test_negatives_into_a_folder_being_written_are_refused(sd1_dir, tmp_path, live_pid):
    output = tmp_path / "negatives"
    hold(output, live_pid)
    with pytest.raises(UserError, match=rf"negatives: another negatives run is using it \(process {live_pid} on "):
        negatives.generate_set(load_pipeline(sd1_dir), {"cat": "a cat"}, output,
                               settings=SampleSettings(steps=2, batch_size=1), progress=False)
    assert sorted(p.name for p in output.iterdir()) == [".lock"]  # no manifest, no image


def test_pretrain_onto_an_output_in_use_is_refused(tmp_path, live_pid):
    hold(tmp_path / "model.checkpoints", live_pid)
    with pytest.raises(UserError, match=rf"model.checkpoints: another toy-world pretraining run is using it "
                                        rf"\(process {live_pid} on "):
        pretrain.pretrain(pretrain.default_config(), tmp_path / "model", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.checkpoints"]
    assert sorted(p.name for p in (tmp_path / "model.checkpoints").iterdir()) == [".lock"]


def train_args(workdir: Path, model: Path, data: Path, steps: int) -> list[str]:
    return ["train", "--config", str(CONFIG), "--workdir", str(workdir), f"--config.model={model}",
            f"--config.data.images={data / 'images'}", f"--config.data.captions={data / 'captions'}",
            f"--config.data.negatives={data / 'negatives'}", f"--config.train.steps={steps}"]


def start_training(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as output:
        return subprocess.Popen([sys.executable, "-m", "nsync_jax.cli", *args], cwd=ROOT, stdout=output,
                                stderr=subprocess.STDOUT)


def wait_for_lock(workdir: Path, process: subprocess.Popen, log: Path) -> dict:
    deadline = time.monotonic() + 240
    while not (workdir / ".lock").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never took its lock"
        time.sleep(0.05)
    holder = json.loads((workdir / ".lock").read_text())
    assert holder["pid"] == process.pid
    return holder


def logged_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_runs_on_one_workdir_the_second_is_refused_and_a_killed_runs_lock_blocks_nothing(
        sd1_dir, style_dir, tmp_path, capsys):
    work, log = tmp_path / "work", tmp_path / "first.log"
    # A run in another process; while it holds the workdir, a second run is refused in one line.
    first = start_training(train_args(work, sd1_dir, style_dir, steps=40), log)
    try:
        wait_for_lock(work, first, log)
        assert main(train_args(work, sd1_dir, style_dir, steps=40)) == 2
        assert first.poll() is None  # the refusal came while the first run held the workdir
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"nsync-jax: error: {work}: another training run is using it (process "
                                f"{first.pid} on {HOST}, since ")
        # The first run goes on to its end, alone: every step logged once, one TensorBoard log.
        assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        first.kill()
    assert logged_steps(work) == list(range(1, 41))
    assert len(list((work / "tensorboard").iterdir())) == 1
    assert not (work / ".lock").exists()

    # A run killed while it holds the workdir leaves its lock; the next run takes it over and finishes.
    killed = start_training(train_args(work, sd1_dir, style_dir, steps=46), log)
    try:
        wait_for_lock(work, killed, log)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert json.loads((work / ".lock").read_text())["pid"] == killed.pid
    assert main(train_args(work, sd1_dir, style_dir, steps=46)) == 0, capsys.readouterr().err
    assert logged_steps(work)[-6:] == list(range(41, 47))
    assert not (work / ".lock").exists()


def test_a_checkpoint_that_does_not_fit_the_run_is_refused_in_one_line(tmp_path):
    """Another trainable (other names), another optimizer chain (other tree) or other shapes: one line that
    names the folder, not Orbax's traceback."""
    import jax.numpy as jnp
    import optax

    manager = checkpoints.manager(tmp_path / "checkpoints", keep=2)
    rows = jnp.ones((2, 4))
    adamw = optax.adamw(1e-3)
    checkpoints.save(manager, 1, {"rows": rows, "opt_state": adamw.init(rows)}, {"step": 1})
    manager.wait_until_finished()
    clipped = optax.chain(optax.clip_by_global_norm(1.0), adamw)
    for like in ({"params": rows, "opt_state": adamw.init(rows)},
                 {"rows": rows, "opt_state": clipped.init(rows)},
                 {"rows": jnp.ones((3, 4)), "opt_state": adamw.init(jnp.ones((3, 4)))}):
        with pytest.raises(UserError) as refused:
            checkpoints.restore(manager, 1, like)
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / 'checkpoints'}: checkpoint 1 ") and "\n" not in message
    state, meta = checkpoints.restore(manager, 1, {"rows": rows, "opt_state": adamw.init(rows)})
    np.testing.assert_array_equal(state["rows"], rows)
    assert meta == {"step": 1}
