"""What clusters do to a run, inflicted for real: SIGTERM and Ctrl-C to the driver, a learner rank
SIGKILLed mid-run, a full volume (a 3 MiB tmpfs), a truncated checkpoint file; and the checkpoint
rules underneath (manifest, fallback, retention, the rollback target kept)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from dispo_ray.infra import checkpoints
from dispo_ray.infra.run_state import checkpoint_dir, mark_latest
from runs import REPO, SMALL, sabotage, train_steps


# ---------------------------------------------------------------- checkpoint rules, by hand
def _fake_checkpoint(run_dir, step, payload=b"x" * 1000):
    path = checkpoint_dir(str(run_dir), step)
    os.makedirs(os.path.join(path, "learner", "global_step1"))
    with open(os.path.join(path, "learner", "global_step1", "model_states.pt"), "wb") as f:
        f.write(payload)
    with open(os.path.join(path, "driver_state.json"), "w") as f:
        f.write('{"step": %d}' % step)
    checkpoints.write_manifest(path, step)
    mark_latest(str(run_dir), step)
    return path


def test_manifest_names_the_damaged_file_and_resume_falls_back(tmp_path):
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    m = json.load(open(os.path.join(checkpoint_dir(str(tmp_path), 6), "manifest.json")))
    assert m["bytes"] == 1000 + len('{"step": 6}') and len(m["files"]) == 2
    assert checkpoints.newest_valid(str(tmp_path)) == (checkpoint_dir(str(tmp_path), 6), [])
    # step 6 truncated, step 4 with one byte flipped (same size): both skipped, with why
    victim = os.path.join(checkpoint_dir(str(tmp_path), 6), "learner", "global_step1", "model_states.pt")
    os.truncate(victim, 10)
    flip = os.path.join(checkpoint_dir(str(tmp_path), 4), "learner", "global_step1", "model_states.pt")
    with open(flip, "r+b") as f:
        f.write(b"y")
    path, skipped = checkpoints.newest_valid(str(tmp_path))
    assert path == checkpoint_dir(str(tmp_path), 2)
    assert [os.path.basename(p) for p, _ in skipped] == ["step_6", "step_4"]
    assert victim in skipped[0][1] and "10 bytes" in skipped[0][1] and "1000" in skipped[0][1]
    assert flip in skipped[1][1] and "checksum" in skipped[1][1]
    # a folder without a manifest (a save cut short) is never restored
    os.makedirs(checkpoint_dir(str(tmp_path), 8))
    mark_latest(str(tmp_path), 8)
    assert checkpoints.newest_valid(str(tmp_path))[1][0][1].startswith("no manifest.json")
    # after a rollback `latest` names an older step: newer folders are the abandoned branch
    mark_latest(str(tmp_path), 2)
    assert checkpoints.newest_valid(str(tmp_path)) == (checkpoint_dir(str(tmp_path), 2), [])


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    for s in (0, 1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, s)
    assert checkpoints.prune(str(tmp_path), keep=0) == []  # 0 = keep all
    assert checkpoints.prune(str(tmp_path), keep=2, protected=[1]) == [0, 2, 3]
    assert checkpoints.steps(str(tmp_path)) == [1, 4, 5]


def test_the_guard_protects_the_checkpoint_its_rollback_would_restore():
    from dispo_ray.algorithm.collapse_guard import CollapseGuard
    from dispo_ray.infra.config import compose

    def guard(k, action="rollback", patience=4):
        cfg = compose([f"trainer.collapse_guard.action={action}", f"trainer.collapse_guard.patience={patience}",
                       "trainer.save_every=1"]).trainer.collapse_guard
        g = CollapseGuard(cfg, max_staleness=k)
        for c in (0, 2, 4, 6):
            g.record_checkpoint(c)
        return g

    # no streak: the earliest one starts at step 7, its batches were sampled by c >= 5: restore c <= 5 -> 4
    assert guard(0).protected_checkpoints(6) == [4]
    g = guard(0)
    for step in (5, 6):  # repetition above its limit at steps 5 and 6: a streak that began at 5
        assert g.update(step, {"rollout/repetition": 1.0}) == []
    assert g.protected_checkpoints(6) == [2]  # c + 1 + k < 5 -> c <= 3 -> 2
    g = guard(1)  # one step of staleness moves it back one more: c <= 2 -> 2
    for step in (5, 6):
        g.update(step, {"rollout/repetition": 1.0})
    assert g.protected_checkpoints(6) == [2]
    g.update(7, {"rollout/repetition": 1.0})  # began at 5, now at step 7: c <= 2 still
    assert g.protected_checkpoints(7) == [2]
    g = guard(1)
    for step in (4, 5, 6):  # began at 4: c + 2 < 4 -> c <= 1 -> 0
        g.update(step, {"rollout/repetition": 1.0})
    assert g.protected_checkpoints(6) == [0]
    assert guard(0, action="warn").protected_checkpoints(6) == []


def test_no_space_is_named_and_the_partial_folder_removed(tmp_path):
    path = os.path.join(tmp_path, "checkpoints", "step_5")
    os.makedirs(path)
    err = checkpoints.write_failed(5, path, 7 << 20, OSError(28, "No space left on device"))
    assert str(err).startswith(f"no space left writing checkpoint step 5 under {path} (needs ~7.0 MB")
    assert not os.path.exists(path)
    other = checkpoints.write_failed(5, path, 1, PermissionError(13, "Permission denied"))
    assert "failed: PermissionError" in str(other) and "no space" not in str(other)


def test_a_second_ctrl_c_stops_at_once_a_repeated_sigterm_does_not():
    """Real signals to this (main) thread. `timeout` delivers its SIGTERM twice (to the child and to
    the group): that is one stop. A second Ctrl-C, seconds later, means "now"."""
    from dispo_ray.infra.stop import DEBOUNCE_S, StopNow, StopRequest
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        term = StopRequest().install()
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(DEBOUNCE_S)
        assert term.requested and term.exit_code == 143 and term.name == "SIGTERM"

        ctrl_c = StopRequest().install()
        os.kill(os.getpid(), signal.SIGINT)  # recorded, nothing raised
        os.kill(os.getpid(), signal.SIGINT)  # the same press passed on by a wrapper: ignored
        time.sleep(0.05)
        assert ctrl_c.requested and ctrl_c.exit_code == 130 and ctrl_c.name == "SIGINT"
        time.sleep(DEBOUNCE_S)
        with pytest.raises(StopNow) as e:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler raises here, in the main thread
        assert e.value.signum == signal.SIGINT
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_the_resume_command_keeps_the_overrides():
    from dispo_ray.infra.stop import resume_command
    cmd = resume_command("/r un", ["algorithm=dapo", "trainer.run_dir=/old", "trainer.resume=false"])
    assert cmd == "python -m dispo_ray.main algorithm=dapo 'trainer.run_dir=/r un' trainer.resume=true"


# ---------------------------------------------------------------- signals and disk, on real runs
def _launch(run_dir, *extra):
    args = [sys.executable, "-m", "dispo_ray.main", *SMALL, f"trainer.run_dir={run_dir}", *extra]
    # a new session, like a terminal's foreground job; SIGINT at its default (a background shell ignores it)
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_checkpoint(p, run_dir, at_least, timeout=300):
    marker = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.monotonic() + timeout
    while True:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        try:
            if int(open(marker).read().strip().split("_")[1]) >= at_least:
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.05)


def _console_errors(err):
    """stderr lines that are ours (not Ray's, DeepSpeed's or a progress bar's)."""
    return [ln for ln in err.splitlines() if ln.startswith(("stopped by", "error:", "Traceback"))]


def test_sigterm_saves_exits_143_keeps_two_and_a_damaged_newest_is_skipped(tmp_path):
    run_dir = str(tmp_path / "run")
    p = _launch(run_dir, "trainer.total_steps=400", "trainer.save_every=1", "trainer.keep_checkpoints=2")
    _wait_for_checkpoint(p, run_dir, 3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)  # as `timeout` sends it: to the driver, then to its process group
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 143, err[-3000:]
    lines = _console_errors(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    step = json.load(open(os.path.join(run_dir, "summary.json")))["steps"]
    newest = checkpoint_dir(run_dir, step)
    assert lines[0].startswith(f"stopped by SIGTERM at step {step}: checkpoint saved at {newest}; resume with: ")
    assert lines[0].endswith(f"trainer.run_dir={run_dir} trainer.resume=true")
    assert took < 30, f"graceful stop took {took:.1f} s"
    # retention: the newest two complete checkpoints, nothing else
    assert checkpoints.steps(run_dir) == [step - 1, step] and checkpoints.problem(newest) is None

    # the newest checkpoint's largest learner file is truncated: resume skips it, says why, goes on
    files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(newest, "learner")) for n in ns]
    victim = max(files, key=os.path.getsize)
    os.truncate(victim, os.path.getsize(victim) // 2)
    p = _launch(run_dir, f"trainer.total_steps={step + 1}", "trainer.save_every=1", "trainer.keep_checkpoints=2",
                "trainer.resume=true")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert f"WARNING: skipping checkpoint step_{step}: {victim} has" in out
    assert f"resumed from step {step - 1}" in out
    assert [m["step"] for m in train_steps(run_dir)] == list(range(1, step + 2))
    assert checkpoints.steps(run_dir) == [step, step + 1]
    assert all(checkpoints.problem(checkpoint_dir(run_dir, s)) is None for s in (step, step + 1))
    # the finished run leaves its policy as an HF folder that transformers loads
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final_hf")).num_parameters() > 0


def test_ctrl_c_saves_and_exits_130(tmp_path):
    run_dir = str(tmp_path / "run")
    p = _launch(run_dir, "trainer.total_steps=400", "trainer.save_every=50")
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or len(train_steps(run_dir)) < 2:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    lines = _console_errors(err)
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT at step "), err[-3000:]
    step = json.load(open(os.path.join(run_dir, "summary.json")))["steps"]
    assert step >= 2 and checkpoints.newest_valid(run_dir)[0] == checkpoint_dir(run_dir, step)


@pytest.fixture
def small_volume(tmp_path):
    """A real 3 MiB filesystem (tmpfs): less than one checkpoint of the tiny model (~5 MB)."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_volume_is_named_in_one_line_and_latest_never_points_at_a_partial(small_volume):
    run_dir = os.path.join(small_volume, "run")
    p = _launch(run_dir, "trainer.total_steps=3", "trainer.save_every=1")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1, err[-3000:]
    lines = _console_errors(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: no space left writing checkpoint step 1 under {run_dir}/checkpoints/step_1 "
                               f"(needs ~"), lines[0]
    assert "WARNING:" in out and "MB free under" in out  # said before training started
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))
    assert checkpoints.steps(run_dir) == []  # the partial folder is gone


# ---------------------------------------------------------------- a learner rank SIGKILLed
def test_a_learner_rank_killed_mid_run_is_rebuilt_from_the_last_checkpoint(ray_cluster, tmp_path):
    from conftest import call_on
    from dispo_ray.infra.config import compose
    from dispo_ray.rollout.driver import Trainer

    cfg = compose(SMALL + ["learner.num_actors=2", "trainer.total_steps=6", "trainer.save_every=2",
                           f"trainer.run_dir={tmp_path}", "trainer.max_staleness=1"])
    trainer = Trainer(cfg)
    killed = {}

    def kill_rank_1():
        pid = call_on([trainer.learners.actors[1]], lambda _: os.getpid())[0]
        os.kill(pid, signal.SIGKILL)
        killed["at_step"] = trainer.step

    t = sabotage(trainer, 3, kill_rank_1)
    try:
        summary = trainer.fit()
        t.join(timeout=60)
        assert "at_step" in killed
        [event] = summary["learner_recoveries"]
        assert event["what"].startswith("learner rank 1 (pid ") and event["restored_step"] in (2, 4)
        assert 0 < event["failed_at_step"] - event["restored_step"] <= cfg.trainer.save_every
        assert summary["steps"] == 6 and summary["version"] == 6
        # each step logged once, every one trained; the generators hold the final weights
        assert [m["step"] for m in train_steps(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
        assert trainer.generators.versions() == [6]
        assert max(trainer.gate.histogram) <= 1
    finally:
        trainer.shutdown()


def test_when_recovery_is_impossible_one_line_names_the_rank_and_the_resume_command(tmp_path):
    from dispo_ray.infra.failures import RunError, describe
    from dispo_ray.rollout.recovery import recover_learners

    what = "learner rank 1 (pid 4242 on 10.0.0.7) died: Worker unexpectedly exits with a connection error code 2"
    tr = SimpleNamespace(max_learner_restarts=2, save_every=0)
    trainer = SimpleNamespace(cfg=SimpleNamespace(trainer=tr), step=8, run_dir=str(tmp_path), learner_restarts=2)
    with pytest.raises(RunError) as e:
        recover_learners(trainer, what, log=None)
    assert describe(e.value) == str(e.value)  # printed as is, one line
    assert str(e.value).startswith(f"{what} at step 8; trainer.max_learner_restarts=2 recoveries spent. Resume with: ")
    assert "\n" not in str(e.value) and str(e.value).endswith("trainer.resume=true")
    trainer.learner_restarts = 0
    with pytest.raises(RunError, match=r"at step 8; no complete checkpoint to recover from \(trainer.save_every=0"):
        recover_learners(trainer, what, log=None)


def test_resume_with_no_valid_checkpoint_names_the_damage_in_one_line(tmp_path):
    from dispo_ray.infra.failures import RunError
    from dispo_ray.rollout.checkpointing import resume

    trainer = SimpleNamespace(run_dir=str(tmp_path))
    assert resume(trainer) is None  # nothing saved yet: a fresh start
    path = _fake_checkpoint(tmp_path, 3)
    victim = os.path.join(path, "driver_state.json")
    os.remove(victim)
    skipped = []
    with pytest.raises(RunError) as e:
        resume(trainer, skipped.append)
    assert str(e.value) == (f"trainer.resume=true: no complete checkpoint under {tmp_path}/checkpoints; "
                            f"newest: {victim} is missing")
    assert skipped == [f"WARNING: skipping checkpoint step_3: {victim} is missing"]
