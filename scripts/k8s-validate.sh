#!/usr/bin/env bash
# Renders every Kubernetes overlay of deploy/k8s/ with `kubectl kustomize` and validates
# the result offline: built-in kinds with kubernetes-validate (strict) against pinned
# Kubernetes versions, the EMQX custom resource against the schema vendored in
# deploy/k8s/schemas/. Nothing here needs or touches a cluster. README.adoc, "Past one
# machine".
#
#   K8S_VERSIONS  Kubernetes versions to validate against (default below)
#   KUBECTL       the kubectl to render with (default: kubectl; Debian's kubernetes-client,
#                 1.20 with kustomize v2.0.3, renders the same objects as kubectl 1.32)
#   K8S_VENV      venv folder (default: target/k8s-venv in the repository)
#   PYTHON        interpreter that creates the venv (default: python3)
#
# Rendered manifests are left in target/k8s/<overlay>.yaml.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# 1.30: the oldest Kubernetes the manifests target (net.ipv4.tcp_fin_timeout is a safe
# sysctl since 1.29); 1.37: the newest kubernetes-validate 1.37.0 has schemas for.
read -r -a versions <<<"${K8S_VERSIONS:-1.30.0 1.37.0}"
overlays=(legacy ng ng-emqx)
kubectl=${KUBECTL:-kubectl}
requirements=deploy/k8s/schemas/requirements.txt
venv=${K8S_VENV:-"$root/target/k8s-venv"}
python=${PYTHON:-python3}
out=target/k8s

step() { printf '\n==> %s\n' "$*"; }

if ! command -v "$kubectl" >/dev/null 2>&1; then
  echo "error: $kubectl not found; install kubectl (Debian: apt-get install kubernetes-client)" >&2
  exit 1
fi

# The venv, made once per requirements file (concurrent runs wait for each other).
mkdir -p "$(dirname "$venv")" "$out"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv.lock"
  flock 9
fi
stamp="$venv/.lps-requirements"
if ! { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$requirements" "$stamp" \
  && "$venv/bin/python" -c 'import kubernetes_validate' 2>/dev/null; }; then
  step "creating $venv"
  "$python" -m venv --clear "$venv" || {
    echo "error: '$python -m venv' failed; install its venv module (Debian: python3-venv)" >&2
    exit 1
  }
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi
exec 9>&-

step "rendering deploy/k8s/overlays/{$(IFS=,; echo "${overlays[*]}")} with $kubectl"
{ "$kubectl" version --client 2>/dev/null || true; } | head -n 2
files=()
for overlay in "${overlays[@]}"; do
  file="$out/$overlay.yaml"
  # kustomize v5 warns that `bases:` and `patchesStrategicMerge:` are deprecated; they are
  # kept on purpose, for kustomize v2.0.3 (see deploy/k8s/base/kustomization.yaml).
  "$kubectl" kustomize "deploy/k8s/overlays/$overlay" >"$file" 2> >(grep -v "is deprecated" >&2)
  echo "$overlay: $(grep -c '^kind:' "$file") resources → $file"
  files+=("$file")
done

for version in "${versions[@]}"; do
  step "validating against Kubernetes $version ($("$venv/bin/pip" show kubernetes-validate 2>/dev/null | awk '/^Version:/ {print "kubernetes-validate " $2}'))"
  "$venv/bin/python" deploy/k8s/schemas/validate.py "$version" "${files[@]}"
done
