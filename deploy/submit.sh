#!/usr/bin/env bash
# Submit the training job to a running Ray cluster (the long-lived KubeRay cluster of
# deploy/kuberay-ray-cluster-values.yaml, or any `ray start --head`).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh trainer.total_steps=200 model.path=/mnt/models/qwen
#   EPS_HIGH_NEG=55 deploy/submit.sh ...            # the four DISPO clip parameters, by env var
#   SUBMIT_ARGS="--no-wait --submission-id run-1" deploy/submit.sh ...   # extra `ray job submit` flags
#   PIN_TO_GROUPS=1 deploy/submit.sh ...            # each pool only on the nodes advertising its
#                                                   # resource (dispo_generator / dispo_learner / dispo_reward,
#                                                   # as deploy/kuberay-ray-cluster-values.yaml's groups do)
#   RAY_AUTH_SECRET=dispo-cluster-ray-token deploy/submit.sh ...   # the token from that Kubernetes Secret
#
# Ray token authentication: the cluster refuses a job without its token, and so does this script
# before it uploads anything. Ray's CLI sends the token when RAY_AUTH_MODE=token (set here), from
# RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; RAY_AUTH_SECRET=<name>
# (RAY_AUTH_NAMESPACE=<ns>) reads RAY_AUTH_TOKEN from that Secret's key auth_token with kubectl.
#
# The checkout is uploaded as the job's working dir, minus what deploy/runtime_env.yaml excludes;
# arguments after the script name are Hydra overrides (the last one wins, so they may also
# override the clip values set here). The job joins the cluster (cluster.address=auto). Set
# trainer.run_dir to shared storage: the default (runs/...) lies in the job's temporary working dir.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
RAY_BIN="${RAY_BIN:-ray}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" != token ]]; then
  echo "submit.sh: RAY_AUTH_MODE=$RAY_AUTH_MODE refused: jobs go only to clusters with token authentication (RAY_AUTH_MODE=token)" >&2
  exit 2
fi
if [[ -z "${RAY_AUTH_TOKEN:-}" && -n "${RAY_AUTH_SECRET:-}" ]]; then
  ns=()
  [[ -n "${RAY_AUTH_NAMESPACE:-}" ]] && ns=(-n "$RAY_AUTH_NAMESPACE")
  RAY_AUTH_TOKEN="$(kubectl get secret "${ns[@]}" "$RAY_AUTH_SECRET" -o jsonpath='{.data.auth_token}' | base64 -d)"
  export RAY_AUTH_TOKEN
fi
if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "${RAY_AUTH_TOKEN_PATH:-${HOME:-/nonexistent}/.ray/auth_token}" ]]; then
  echo "submit.sh: no Ray auth token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or RAY_AUTH_SECRET=<Kubernetes Secret> (the cluster refuses unauthenticated jobs)" >&2
  exit 2
fi
read -r -a submit_args <<< "${SUBMIT_ARGS:-}"
pins=()
if [[ "${PIN_TO_GROUPS:-0}" == 1 ]]; then
  pins=(generator.node_resource=dispo_generator learner.node_resource=dispo_learner reward.node_resource=dispo_reward)
fi

exec "$RAY_BIN" job submit --address "$RAY_ADDRESS" \
  --working-dir . --runtime-env deploy/runtime_env.yaml \
  "${submit_args[@]}" \
  -- python -m dispo_ray.main cluster.address=auto algorithm=dispo \
  "algorithm.eps_low_pos=${EPS_LOW_POS:-0.2}" \
  "algorithm.eps_high_pos=${EPS_HIGH_POS:-10.0}" \
  "algorithm.eps_low_neg=${EPS_LOW_NEG:-1.0}" \
  "algorithm.eps_high_neg=${EPS_HIGH_NEG:-100.0}" \
  "${pins[@]}" "$@"
