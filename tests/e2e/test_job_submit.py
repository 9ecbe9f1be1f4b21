"""`ray job submit` end to end: a real Ray head on loopback (its own ports and temp dir), the
training job submitted through the real Job API and polled to SUCCEEDED: once by deploy/submit.sh,
once as verl and OpenRLHF users submit, the plain `ray job submit --working-dir . -- python -m
dispo_ray.main ...` with no wrapper and no cluster.address (the driver finds it is a Ray job and
joins the cluster instead of starting its own). Both jobs share one head.

Ray token authentication on that head: the job API refuses a request without the token or with a
wrong one (HTTP 401 / 403), and deploy/submit.sh refuses to run without a token (before uploading).

Also: what `--working-dir .` would upload with deploy/runtime_env.yaml's excludes, measured with
Ray's own packaging code (the zip Ray builds), must stay small.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "deploy" / "runtime_env.yaml"
SUBMIT = REPO / "deploy" / "submit.sh"
VENV_BIN = Path(sys.executable).parent
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
JOB_TIMEOUT_S = 15 * 60


def _excludes() -> list:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    return env["excludes"]


def _package(root: Path, out: Path) -> Path:
    """Zip `root` exactly as Ray does for a job's working_dir (gitignore files not consulted, so
    the excludes alone must do the job, whatever a user's .gitignore holds)."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(root), out, include_gitignore=False, excludes=_excludes())
    return out


def test_runtime_env_is_the_one_submit_sh_uses():
    text = SUBMIT.read_text()
    assert "--runtime-env deploy/runtime_env.yaml" in text and "--working-dir ." in text
    assert "cluster.address=auto" in text
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    # env_vars would clash with the ones the driver passes to ray.init (Ray refuses the merge)
    assert set(env) == {"excludes"}


def test_upload_of_this_checkout_is_small(tmp_path):
    z = _package(REPO, tmp_path / "wd.zip")
    size = z.stat().st_size
    names = zipfile.ZipFile(z).namelist()
    assert size < MAX_UPLOAD_BYTES, f"working dir package is {size / 2**20:.1f} MiB"
    assert "dispo_ray/main.py" in names and "conf/config.yaml" in names
    assert any(n.startswith("actors/") for n in names)
    assert not any(n.startswith((".venv/", ".git/", "runs/")) for n in names)


def test_excludes_drop_heavy_files_and_keep_code(tmp_path):
    root = tmp_path / "proj"
    heavy = [".venv/lib/torch.so", ".git/objects/pack/p.pack", "runs/r1/checkpoints/step_2/model.safetensors",
             "outputs/x.log", "data/train.parquet", "ckpt/optim.pt", "dispo_ray/__pycache__/m.cpython-311.pyc",
             "wandb/run-1/files/out.bin", "runs2/events.out.tfevents.123.host", "build/gpu-kit/py/torch_ext.so",
             "tests/deploy/schemas/kuberay-v1.7.0-ray.io_rayjobs.yaml"]
    light = ["dispo_ray/main.py", "actors/generator.py", "conf/config.yaml", "deploy/submit.sh", "tests/test_x.py"]
    for rel in heavy + light:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(64 * 1024) if rel in heavy else b"x = 1\n")
    names = set(zipfile.ZipFile(_package(root, tmp_path / "p.zip")).namelist())
    assert set(light) <= names
    assert not names & set(heavy), sorted(names & set(heavy))


def _no_auth_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAY_ADDRESS="http://127.0.0.1:9", RAY_BIN=str(home / "ray-not-installed"))
    return env


def test_submit_sh_refuses_without_a_token_in_one_line(tmp_path):
    env = _no_auth_env(tmp_path)
    out = subprocess.run(["bash", str(SUBMIT), "trainer.total_steps=2"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "no Ray auth token" in out.stderr and "RAY_AUTH_TOKEN" in out.stderr
    out = subprocess.run(["bash", str(SUBMIT)], env=dict(env, RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="t"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "RAY_AUTH_MODE=disabled refused" in out.stderr, out.stderr
    # a token (here Ray's default file) passes the gate: the script goes on to exec the ray CLI
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    out = subprocess.run(["bash", str(SUBMIT)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 127 and "ray-not-installed" in out.stderr, out.stderr


# ---------------------------------------------------------------- the real job
def _free_ports(n: int) -> list:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _kill_tree(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop only this head: its process group, then any process naming its temp dir (never `ray stop`)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="dr-job-", dir="/tmp")  # short: Ray's unix sockets live under it
    (gcs, dash, client, nm, om, agent_listen, agent_grpc, metrics, rt_env) = _free_ports(9)
    # Ray 2.60 protects the job API with a token (on by default for local clusters): give this head
    # its own, by environment, so neither ~/.ray/auth_token nor other engineers' clusters are touched.
    token = secrets.token_hex(32)
    # RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` waits this long after SIGTERM before SIGKILL (Ray's
    # default 3 s); the chart's head sets it too, so a graceful stop can save its checkpoint.
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_JOB_STOP_WAIT_TIME_S="60")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent_listen}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={rt_env}", "--num-cpus=8", "--num-gpus=0",
           '--resources={"dispo_generator": 1, "dispo_learner": 1, "dispo_reward": 1}',  # the chart's pins
           "--object-store-memory=500000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "ray-start.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 180
        while True:
            assert head.poll() is None, Path(temp_dir, "ray-start.log").read_text()[-3000:]
            try:
                client_ = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                client_.list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        yield address, client_, env, token
    finally:
        _kill_tree(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_success(client, sub_id: str, run_dir: Path) -> str:
    """Poll the job to a final state; assert SUCCEEDED and two logged steps. Returns its logs."""
    from ray.job_submission import JobStatus

    deadline = time.time() + JOB_TIMEOUT_S
    status = client.get_job_status(sub_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(5)
        status = client.get_job_status(sub_id)
    logs = client.get_job_logs(sub_id)
    if status != JobStatus.SUCCEEDED:
        client.stop_job(sub_id)
    assert status == JobStatus.SUCCEEDED, f"job {status}; last log lines:\n{logs[-4000:]}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines, "metrics.jsonl is empty"
    assert max(r["step"] for r in lines) == 2, [r["step"] for r in lines]
    return logs


def _status(url: str, headers: dict) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_job_api_refuses_requests_without_the_token(ray_head, tmp_path):
    address, client, env, token = ray_head
    url = f"{address}/api/jobs/"
    assert _status(url, {}) == 401
    assert _status(url, {"Authorization": f"Bearer {secrets.token_hex(32)}"}) == 403
    assert _status(url, {"Authorization": f"Bearer {token}"}) == 200
    # the job CLI through deploy/submit.sh with a wrong token: refused, and no job was created
    before = {j.submission_id for j in client.list_jobs()}
    out = subprocess.run(["bash", str(SUBMIT), "trainer.total_steps=2"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(env, RAY_ADDRESS=address, RAY_BIN=str(VENV_BIN / "ray"), RAY_AUTH_TOKEN=secrets.token_hex(32)),
                         timeout=300)
    assert out.returncode != 0 and "Authentication failed" in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert {j.submission_id for j in client.list_jobs()} == before


@pytest.mark.slow
def test_submit_sh_runs_two_steps_on_a_local_head(ray_head, tmp_path):
    address, client, env, _ = ray_head
    run_dir = tmp_path / "run"
    sub_id = f"dispo-test-{uuid.uuid4().hex[:8]}"
    env = dict(env, RAY_ADDRESS=address, RAY_BIN=str(VENV_BIN / "ray"),
               SUBMIT_ARGS=f"--no-wait --submission-id {sub_id}", EPS_HIGH_NEG="55", PIN_TO_GROUPS="1")
    out = subprocess.run(
        ["bash", str(SUBMIT), "trainer.total_steps=2", "trainer.eval_every=0", "trainer.eval_max_prompts=8",
         "trainer.prompts_per_step=4", "trainer.progress_bar=false", "trainer.tensorboard=false",
         f"trainer.run_dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # cwd: submit.sh finds the repo itself
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    info = client.get_job_info(sub_id)
    assert "algorithm.eps_high_neg=55" in info.entrypoint and "cluster.address=auto" in info.entrypoint
    wait_for_success(client, sub_id, run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["algorithm"]["eps_high_neg"] == 55.0  # the env-var clip override reached the run
    assert cfg["cluster"]["address"] == "auto"
    # every pool was pinned to its group's resource, and the job still ran: the requests fit
    assert [cfg[k]["node_resource"] for k in ("generator", "learner", "reward")] == \
        ["dispo_generator", "dispo_learner", "dispo_reward"]


@pytest.mark.slow
def test_plain_ray_job_submit_joins_the_cluster(ray_head, tmp_path):
    """No wrapper, no cluster.address: the job's driver joins the head it runs on (before the fix
    Ray refused: "When connecting to an existing cluster, num_cpus and num_gpus must not be provided")."""
    address, client, env, _ = ray_head
    run_dir = tmp_path / "run"
    sub_id = f"dispo-plain-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
         "--submission-id", sub_id, "--", "python", "-m", "dispo_ray.main", "trainer.total_steps=2",
         "trainer.eval_every=0", "trainer.eval_max_prompts=8", "trainer.prompts_per_step=4",
         "trainer.tensorboard=false", f"trainer.run_dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # .gitignore keeps .venv out of the upload
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    logs = wait_for_success(client, sub_id, run_dir)
    assert "Started a local Ray instance" not in logs  # it joined; it did not start a Ray of its own
    assert "\r" not in logs and "step 2/2" in logs  # a job log is no TTY: plain lines, no bar
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["cluster"]["address"] is None


@pytest.mark.slow
def test_ray_job_stop_saves_a_checkpoint_and_says_how_to_resume(ray_head, tmp_path):
    """`ray job stop` sends SIGTERM to the entrypoint: the driver finishes its step, saves, and
    says in one line where the checkpoint is and how to resume (dispo_ray/infra/stop.py)."""
    from ray.job_submission import JobStatus

    from dispo_ray.infra import checkpoints
    from runs import SMALL

    address, client, env, _ = ray_head
    run_dir = tmp_path / "run"
    sub_id = f"dispo-stop-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
         "--submission-id", sub_id, "--", "python", "-m", "dispo_ray.main", *SMALL, "trainer.total_steps=500",
         "trainer.save_every=50", f"trainer.run_dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    deadline = time.time() + JOB_TIMEOUT_S
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:  # step 0 (eval) + two steps
        assert client.get_job_status(sub_id) in (JobStatus.PENDING, JobStatus.RUNNING), \
            client.get_job_logs(sub_id)[-3000:]
        assert time.time() < deadline, "the job never logged two steps"
        time.sleep(0.5)
    stop = subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", address, sub_id], env=env,
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    assert client.get_job_status(sub_id) == JobStatus.STOPPED
    logs = client.get_job_logs(sub_id)
    lines = [ln for ln in logs.splitlines() if ln.startswith(("stopped by", "error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGTERM at step "), logs[-3000:]
    step = int(lines[0].split("at step ")[1].split(":")[0])
    newest = checkpoints.checkpoint_dir(str(run_dir), step)
    assert f"checkpoint saved at {newest}; resume with: " in lines[0] and step >= 2
    assert checkpoints.newest_valid(str(run_dir)) == (newest, [])

