#!/usr/bin/env bash
# Build the real servers used by the controlplane and trainer test tiers from their published Go modules:
# etcd, kube-apiserver / kube-controller-manager / kube-scheduler, kwok, the Kubeflow training operator v1,
# Kubeflow Trainer v2's controller manager and the JobSet controller under it, MinIO, the Helm v3 CLI (the chart
# tests render and lint with it), kubectl (the e2e tier drives the cluster with it, as a user would) and s5cmd (the
# S3 client bench/bench_s3_pull.py compares the trainer's transfers with; no test needs it, so it is not in the
# default set). Binaries go to a cache outside the repository, one directory per component and version:
#
#   ${FTJ_TESTBIN_DIR:-$HOME/.cache/finetune-operator/testbin}/<component>-<version>/
#
# A directory counts as built only when its `.complete` stamp (written last) exists, so an interrupted build is
# redone and a finished one is reused. Idempotent: run it as often as you like; only what is missing is built.
#
# Usage: bash tests/testbin/build.sh [--force] [component ...]
#   components: etcd kubernetes kubectl kwok training-operator trainer-v2 jobset minio helm s5cmd
#               (default: all but s5cmd, which only the S3 benchmark uses)
#   --force     rebuild even when the stamp is present
#   --print-dir print the cache directory and exit
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# s5cmd (github.com/peak/s5cmd/v2), for the S3 benchmark only; the newest release the Go module proxy serves.
# Pinned here until versions.env carries it (tests/support/testbin.py reads it from either file).
S5CMD_VERSION="${S5CMD_VERSION:-v2.3.0}"

cache="${FTJ_TESTBIN_DIR:-$HOME/.cache/finetune-operator/testbin}"
all_components=(etcd kubernetes kubectl kwok training-operator trainer-v2 jobset minio helm)

force=0
components=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --print-dir) echo "$cache"; exit 0 ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        etcd|kubernetes|kubectl|kwok|training-operator|trainer-v2|jobset|minio|helm|s5cmd) components+=("$arg") ;;
        *) echo "build.sh: unknown argument '$arg' (components: ${all_components[*]} s5cmd)" >&2; exit 2 ;;
    esac
done
if [ "${#components[@]}" -eq 0 ]; then
    components=("${all_components[@]}")
fi

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: 'go' is not on PATH; the real test tier needs Go >= 1.26 to build its servers" >&2
    exit 1
fi

# Never let a module's toolchain line trigger a toolchain download; fail loudly instead.
export GOTOOLCHAIN=local
# The module and build caches stay at their defaults (~/go/pkg/mod, ~/.cache/go-build) so they stay warm.
export CGO_ENABLED=0
gobuild_flags=(-trimpath)

mkdir -p "$cache"
# Two builds at once (a developer and CI, say) would fight over the same directories.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.build.lock"
    flock 9
fi

component_version() {
    case "$1" in
        etcd) echo "$ETCD_VERSION" ;;
        kubernetes) echo "$KUBERNETES_VERSION" ;;
        kubectl) echo "$KUBECTL_VERSION" ;;
        kwok) echo "$KWOK_VERSION" ;;
        training-operator) echo "$TRAINING_OPERATOR_VERSION" ;;
        minio) echo "$MINIO_VERSION" ;;
        helm) echo "$HELM_VERSION" ;;
        s5cmd) echo "$S5CMD_VERSION" ;;
        trainer-v2) echo "$TRAINER_V2_VERSION" ;;
        jobset) echo "$JOBSET_VERSION" ;;
    esac
}

build_etcd() {
    local out="$1"
    (cd "$here/etcd" && go build "${gobuild_flags[@]}" -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
}

# What hack/lib/version.sh stamps into release binaries, so clients and servers report the real version.
kubernetes_ldflags() {
    local v="$1" minor pkg ldflags="-s -w"
    minor="$(echo "$v" | cut -d. -f2)"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    echo "$ldflags"
}

build_kubernetes() {
    local out="$1"
    (cd "$here/kubernetes" && go build "${gobuild_flags[@]}" -ldflags "$(kubernetes_ldflags "$KUBERNETES_VERSION")" \
        -o "$out/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler)
}

# kubectl from the same k8s.io/kubernetes module (the same go.mod), in a component of its own so that adding it
# never rebuilds the servers; KUBECTL_VERSION must equal KUBERNETES_VERSION (that go.mod pins one release).
build_kubectl() {
    local out="$1"
    if [ "$KUBECTL_VERSION" != "$KUBERNETES_VERSION" ]; then
        echo "build.sh: KUBECTL_VERSION ($KUBECTL_VERSION) must equal KUBERNETES_VERSION ($KUBERNETES_VERSION)" >&2
        return 1
    fi
    (cd "$here/kubernetes" && go build "${gobuild_flags[@]}" -ldflags "$(kubernetes_ldflags "$KUBECTL_VERSION")" \
        -o "$out/" k8s.io/kubernetes/cmd/kubectl)
}

build_kwok() {
    local out="$1"
    GOBIN="$out" go install "${gobuild_flags[@]}" -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

build_training-operator() {
    local out="$1"
    GOBIN="$out" go install "${gobuild_flags[@]}" -ldflags "-s -w" \
        "github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
}

build_minio() {
    local out="$1"
    GOBIN="$out" go install "${gobuild_flags[@]}" -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
}

build_helm() {
    local out="$1" v="$HELM_VERSION" k8s_minor
    # What helm's Makefile stamps in: the release version, and the Kubernetes version that `helm template` and
    # `helm lint` assume (.Capabilities.KubeVersion) taken from the client-go minor helm is built with.
    k8s_minor="$(cd "$here" && go mod download -json "helm.sh/helm/v3@$v" >/dev/null && \
        sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' \
        "$(go env GOMODCACHE)/cache/download/helm.sh/helm/v3/@v/$v.mod")"
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$v"
    ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    local pkg
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
    done
    GOBIN="$out" go install "${gobuild_flags[@]}" -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$v"
}

# s5cmd built in its released module (downloaded into the module cache) against the dependency versions its own
# go.mod and go.sum pin (the module zip leaves its vendor/ directory out, hence -mod=mod), with the release stamped
# in as its Makefile does, so `s5cmd version` prints it. Not `go install ...@version`: that also asks the proxy for
# the module's version list (to report a deprecation), which the proxy refuses for this module.
build_s5cmd() {
    local out="$1" v="$S5CMD_VERSION" info dir commit
    info="$(cd "$here" && go mod download -json "github.com/peak/s5cmd/v2@$v")"
    dir="$(echo "$info" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    commit="$(echo "$info" | sed -n 's/^[[:space:]]*"Hash": "\([0-9a-f]\{7\}\).*/\1/p')"
    local ldflags="-s -w -X github.com/peak/s5cmd/v2/version.Version=$v"
    ldflags+=" -X github.com/peak/s5cmd/v2/version.GitCommit=${commit:-release}"
    (cd "$dir" && go build "${gobuild_flags[@]}" -mod=mod -ldflags "$ldflags" -o "$out/s5cmd" .)
}

build_trainer-v2() {
    local out="$1"
    GOBIN="$out" go install "${gobuild_flags[@]}" -ldflags "-s -w" \
        "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager@$TRAINER_V2_VERSION"
}

# JobSet, built in its released module like s5cmd (the proxy serves it by exact version only, so `go install
# ...@version` cannot ask for its version list).
build_jobset() {
    local out="$1" dir
    dir="$(cd "$here" && go mod download -json "sigs.k8s.io/jobset@$JOBSET_VERSION" | \
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    (cd "$dir" && go build "${gobuild_flags[@]}" -mod=mod -ldflags "-s -w" -o "$out/jobset" .)
}

# The tests read CRDs, runtimes and webhook manifests of these components from their modules in the module cache
# (never copied into this repository), which may have been cleaned since the build: make each present.
ensure_test_module() {
    local module
    case "$1" in
        training-operator) module="github.com/kubeflow/training-operator" ;;
        trainer-v2) module="github.com/kubeflow/trainer/v2" ;;
        jobset) module="sigs.k8s.io/jobset" ;;
        *) return 0 ;;
    esac
    if [ ! -d "$(go env GOMODCACHE)/$module@$2" ]; then
        (cd "$here" && go mod download "$module@$2")
    fi
}

# The loop sits in a function so bash parses all of it before running any of it (editing this file while a
# build runs then cannot change what that build does).
main() {
    total_start=$SECONDS
    for c in "${components[@]}"; do
        v="$(component_version "$c")"
        dir="$cache/$c-$v"
        if [ "$force" -eq 0 ] && [ -f "$dir/.complete" ]; then
            echo "testbin: $c $v present in $dir"
            ensure_test_module "$c" "$v"
            continue
        fi
        echo "testbin: building $c $v into $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        start=$SECONDS
        "build_$c" "$dir"
        elapsed=$((SECONDS - start))
        printf 'component=%s\nversion=%s\ngo=%s\nbuild_seconds=%s\n' "$c" "$v" "$(go env GOVERSION)" "$elapsed" \
            >"$dir/.complete"
        echo "testbin: built $c $v in ${elapsed}s"
        ensure_test_module "$c" "$v"
    done
    echo "testbin: done in $((SECONDS - total_start))s; binaries under $cache"
}

main; exit
