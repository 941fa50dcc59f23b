#!/usr/bin/env bash
# `make demo`: a local cluster with kwok nodes holding 8 GPUs each, the gray-upgrade operator
# running against it, and the OCR story played out: 25 instances with 2 GPUs each, upgraded in
# place in three batches chosen with `kubectl gantry`. Leaves everything running to explore.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${GANTRY_CACHE:-$HOME/.cache/gantry}
cargo=${CARGO:-cargo}
cluster=${CLUSTER:-gantry}
cd "$repo"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Building the control plane (cached), the operator and kubectl-gantry"
bins=$(GANTRY_CACHE=$cache e2e/cluster/build.sh)
"$cargo" build --quiet -p gantry-gray-upgrade --bins
target=$("$cargo" metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
export PATH="$bins:$target/debug:$PATH"

say "Starting cluster '$cluster': 7 kwok nodes with 8 nvidia.com/gpu each"
GANTRY_CACHE=$cache GANTRY_K8S_BIN_DIR=$bins "$cargo" run --quiet -p gantry-e2e --bin gantry-cluster -- \
  up --name "$cluster" --nodes 7 --capacity nvidia.com/gpu=8
state=$cache/clusters/$cluster
export KUBECONFIG=$state/kubeconfig
kubectl get nodes

say "Installing the GrayApp CRD and starting the operator (log: $state/operators/gray-upgrade.log)"
kubectl apply --server-side -f crds/gray-upgrade.yaml >/dev/null
for _ in $(seq 1 60); do
  [[ $(kubectl get crd grayapps.apps.gantry.dev -o jsonpath='{.status.conditions[?(@.type=="Established")].status}') == True ]] && break
  sleep 1
done
mkdir -p "$state/operators"
if [[ -f $state/operators/gray-upgrade.pid ]]; then
  kill "$(cut -d' ' -f1 "$state/operators/gray-upgrade.pid")" 2>/dev/null || true
fi
GANTRY_E2E_CLUSTER_DIR=$state setsid gantry-gray-upgrade run --metrics-addr 127.0.0.1:0 --health-addr 127.0.0.1:0 \
  >"$state/operators/gray-upgrade.log" 2>&1 &
echo "$! 1" >"$state/operators/gray-upgrade.pid"

wait_for() { # wait_for DESCRIPTION JSONPATH EXPECTED
  for _ in $(seq 1 120); do
    [[ $(kubectl get gapp ocr -o jsonpath="$2" 2>/dev/null) == "$3" ]] && return 0
    sleep 1
  done
  echo "timed out waiting for $1" >&2
  kubectl get gapp ocr -o yaml >&2
  return 1
}

say "Creating GrayApp 'ocr': 25 instances, 2 GPUs each, image ocr:v7"
kubectl delete gapp ocr --ignore-not-found --wait >/dev/null
kubectl apply -f - <<'YAML'
apiVersion: apps.gantry.dev/v1alpha1
kind: GrayApp
metadata:
  name: ocr
spec:
  replicas: 25
  selector: {matchLabels: {app: ocr}}
  template:
    metadata: {labels: {app: ocr}}
    spec:
      containers:
        - name: ocr
          image: ocr:v7
          resources: {limits: {nvidia.com/gpu: "2"}}
  update:
    maxUnavailable: 3
    gracePeriodSeconds: 1
YAML
wait_for "25 ready instances" '{.status.readyReplicas}' 25
kubectl get gapp ocr

say "kubectl gantry upgrade ocr --image ocr=ocr:v8 --instances 2,5,11"
kubectl gantry upgrade ocr --image ocr=ocr:v8 --instances 2,5,11
wait_for "batch 1" '{.status.updatedReplicas}/{.status.readyReplicas}/{.status.rollout.phase}' 3/25/Completed
kubectl get gapp ocr
kubectl gantry status ocr | awk 'NR <= 14'

say "kubectl gantry upgrade ocr --count 10   (10 more, lowest ordinals first)"
kubectl gantry plan ocr
kubectl gantry upgrade ocr --count 10
wait_for "batch 2" '{.status.updatedReplicas}/{.status.readyReplicas}/{.status.rollout.phase}' 13/25/Completed
kubectl get gapp ocr

say "kubectl gantry upgrade ocr   (the rest)"
kubectl gantry upgrade ocr
wait_for "batch 3" '{.status.updatedReplicas}/{.status.readyReplicas}/{.status.rollout.phase}' 25/25/Completed
kubectl get gapp ocr
kubectl gantry history ocr
echo
echo "Same pods on the same nodes, each container restarted once:"
kubectl get pods -l app=ocr -o custom-columns=POD:.metadata.name,NODE:.spec.nodeName,IMAGE:.spec.containers[0].image,RESTARTS:.status.containerStatuses[0].restartCount | awk 'NR <= 8'
echo "..."
echo
echo "Events of the app:"
kubectl get events.events.k8s.io --field-selector regarding.name=ocr -o custom-columns=REASON:.reason,NOTE:.note | awk '{ l[NR] = $0 } END { for (i = NR > 8 ? NR - 7 : 1; i <= NR; i++) print l[i] }'

say "Explore"
cat <<EOT
export KUBECONFIG=$KUBECONFIG
export PATH=$bins:$target/debug:\$PATH
kubectl get gantry                      # every Gantry object
kubectl gantry status ocr
kubectl gantry rollback ocr             # back to v7, maxUnavailable at a time
make cluster-down CLUSTER=$cluster      # stops the operator and the cluster
EOT
