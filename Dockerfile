# mlaas4hep images, on the official Ray image (Ray 2.60, Python 3.11).
#   platform, CPU:       docker build -t mlaas4hep .
#   platform, GPU:       docker build --build-arg RAY_IMAGE_TAG=2.60.0-py311-gpu -t mlaas4hep:gpu .
#   XRootD proxy-cache:  docker build --target xcache -t mlaas4hep-xcache .
# The Ray version of the tag must match the ray pin of pyproject.toml (a test checks it).
ARG RAY_IMAGE_TAG=2.60.0-py311-cpu
ARG DEBIAN_IMAGE=debian:trixie-slim

# ---------------------------------------------------------------- wheels (build tools here)
FROM rayproject/ray:${RAY_IMAGE_TAG} AS wheels
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential cmake libssl-dev uuid-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlaas4hep ./mlaas4hep
# Every dependency as a wheel, compiled here when PyPI has none for this platform.
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

# ---------------------------------------------------------------- XRootD proxy-cache
# Runs k8s/base/xcache/xcache.cfg, mounted from the xcache-config ConfigMap.
FROM ${DEBIAN_IMAGE} AS xcache
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        xrootd-server xrootd-client ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10940 xcache \
    && useradd --uid 10940 --gid 10940 --no-create-home --shell /usr/sbin/nologin xcache
USER 10940:10940
EXPOSE 1094
ENTRYPOINT ["xrootd"]
CMD ["-c", "/etc/xcache/xcache.cfg", "-p", "1094"]

# ---------------------------------------------------------------- platform (final)
FROM rayproject/ray:${RAY_IMAGE_TAG} AS platform
USER root
# The XRootD client (xrdcp, xrdfs) for root:// inputs and bubblewrap (bwrap), the sandbox a
# user's model.py runs in (setting model_sandbox); compilers the base image may carry are
# removed: the final image installs wheels only.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        xrootd-client bubblewrap \
    && tools="$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' \
        build-essential 'gcc*' 'g++*' 'cpp*' clang cmake make 2>/dev/null \
        | awk '$1 == "ii" && $2 !~ /-base$/ {print $2}')" \
    && if [ -n "$tools" ]; then apt-get purge -y --auto-remove $tools; fi \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheels /wheels /tmp/wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels mlaas4hep \
    && rm -rf /tmp/wheels
ENV TF_USE_LEGACY_KERAS=1 \
    RAY_AUTH_MODE=token \
    MLAAS4HEP_HOME=/home/ray/.mlaas4hep
# The Ray image's unprivileged user (uid 1000, group users).
USER 1000:100
WORKDIR /home/ray
EXPOSE 8000 8265 6379 10001
CMD ["mlaas4hep", "--help"]
