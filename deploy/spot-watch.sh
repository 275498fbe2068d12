#!/usr/bin/env bash
# Turns an EC2 spot interruption notice into a Ray drain on this node.
#
# EC2 gives a spot instance two minutes' notice through the instance metadata service and then
# stops it; nothing sends the Ray processes a signal before that. This loop polls the notice and,
# when it appears, marks the local Ray node as preempted (`ray drain-node --reason
# DRAIN_NODE_REASON_PREEMPTION`), which is what Ray Train's preemption handling reacts to: it takes
# a checkpoint and moves the workers while the node still runs. Without it a reclaim is a plain
# node failure and the trainer restarts from its last periodic checkpoint.
#
# Started in the background on every worker by deploy/cluster-aws.yaml (worker_start_ray_commands);
# on on-demand nodes it never finds a notice. `ray drain-node` is a hidden Ray CLI command without
# API-stability guarantees: check it on a new Ray version.
set -uo pipefail

IMDS=http://169.254.169.254
POLL_SECONDS=${SPOT_WATCH_POLL_SECONDS:-5}
# Seconds left after the notice (EC2 gives about 120); passed to Ray as the drain deadline.
DEADLINE_SECONDS=${SPOT_WATCH_DEADLINE_SECONDS:-100}
HEAD=${RAY_HEAD_IP:-}

# The notice (JSON) on stdout and status 0 when there is one; IMDSv2, with Python's standard
# library so the image needs no curl.
interruption_notice() {
  python - "$IMDS" <<'PY'
import sys, urllib.request
imds = sys.argv[1]
try:
    put = urllib.request.Request(imds + "/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    token = urllib.request.urlopen(put, timeout=2).read().decode()
    get = urllib.request.Request(imds + "/latest/meta-data/spot/instance-action",
                                 headers={"X-aws-ec2-metadata-token": token})
    print(urllib.request.urlopen(get, timeout=2).read().decode())
except Exception:  # 404 (no notice), no IMDS, timeouts: no notice
    sys.exit(1)
PY
}

while true; do
  if notice=$(interruption_notice); then
    echo "$(date -Is) spot interruption notice: $notice; draining this Ray node"
    address_args=()
    if [ -n "$HEAD" ]; then
      address_args=(--address "$HEAD:6379")
    fi
    ray drain-node ${address_args[@]+"${address_args[@]}"} --reason DRAIN_NODE_REASON_PREEMPTION \
      --reason-message "EC2 spot interruption: $notice" \
      --deadline-remaining-seconds "$DEADLINE_SECONDS" \
      && exit 0
    echo "$(date -Is) ray drain-node failed; retrying"
  fi
  sleep "$POLL_SECONDS"
done
