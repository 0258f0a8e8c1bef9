#!/usr/bin/env bash
# Install the Debian packages the platform needs, when missing: XRootD server and client,
# bubblewrap (bwrap), the sandbox every user model.py runs in, and hey, the HTTP load tool
# of benchmarks/serve_latency.py.
set -euo pipefail

packages=(xrootd-server xrootd-client bubblewrap hey)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "warning: apt-get not found; install ${missing[*]} yourself (XRootD tests will be skipped;" \
        "without bwrap no pipeline with a model.py runs)" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo="sudo" || {
        echo "warning: not root and no sudo; install ${missing[*]} yourself" >&2
        exit 0
    }
fi
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
