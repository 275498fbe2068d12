#!/usr/bin/env bash
# Submit a SegProp run to a running Ray cluster through its dashboard (Ray Jobs API).
#
#   deploy/submit.sh CONFIG [--address URL] [--ray-job] [--no-wait] [-- ARGS...]
#
#   CONFIG      the run config (YAML); its run_dir must be on shared storage (s3://...), since the
#               job runs on the cluster. Re-submitting the same config resumes the run.
#   --address   the dashboard, default $RAY_ADDRESS or http://127.0.0.1:8265 (what
#               `ray dashboard deploy/cluster-aws.yaml` or a kubectl port-forward give you).
#   --ray-job   submit with plain `ray job submit` (the config goes up as the job's working
#               directory) instead of `segprop submit`.
#   --no-wait   return once submitted instead of following the logs (--ray-job only).
#   ARGS        passed on: to `segprop submit`, or to `segprop run` with --ray-job
#               (e.g. -- --set training.learning_rate=1e-4).
#
# Authentication: the cluster uses Ray token authentication, so this sets RAY_AUTH_MODE=token and
# needs the token in RAY_AUTH_TOKEN, in the file RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token
# (where `ray get-auth-token --generate` put it before `ray up`). For a KubeRay cluster:
#   export RAY_AUTH_TOKEN=$(kubectl get secret CLUSTER -o jsonpath='{.data.auth_token}' | base64 -d)
# Credentials for S3 are never sent with the job: the cluster's nodes have their own (instance
# profile, IRSA or a Kubernetes Secret).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage 0 ;; esac
config=$1
shift
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
mode=segprop
wait_flag=()
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address=${2:?--address needs a URL}; shift 2 ;;
    --address=*) address=${1#--address=}; shift ;;
    --ray-job) mode=ray; shift ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --) shift; break ;;
    -h|--help) usage 0 ;;
    *) echo "submit.sh: unknown option $1 (extra arguments go after --)" >&2; exit 2 ;;
  esac
done

[ -f "$config" ] || { echo "submit.sh: config file not found: $config" >&2; exit 2; }

export RAY_AUTH_MODE=token
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
  echo "submit.sh: no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or create" \
       "~/.ray/auth_token (ray get-auth-token --generate, before ray up)" >&2
  exit 2
fi

if [ "$mode" = segprop ]; then
  exec segprop submit "$config" --address "$address" "$@"
fi

# Plain Ray Jobs: the config travels as the job's working directory (uploaded through the
# dashboard), and non-secret S3 settings of this shell travel as job environment variables.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$config" "$stage/config.yaml"
runtime_env=$(python3 - <<'PY'
import json, os
names = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
env = {name: os.environ[name] for name in names if os.environ.get(name)}
print(json.dumps({"env_vars": env}))
PY
)
submission_id="segprop-$(date -u +%Y%m%d-%H%M%S)"
ray job submit --address "$address" --submission-id "$submission_id" \
  --working-dir "$stage" --runtime-env-json "$runtime_env" ${wait_flag[@]+"${wait_flag[@]}"} \
  -- segprop run config.yaml "$@"
