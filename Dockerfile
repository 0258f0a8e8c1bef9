# mlaas4hep image: the platform on the official Ray image (Python 3.11).
# GPU image: docker build --build-arg RAY_IMAGE_TAG=2.60.0-py311-gpu .
ARG RAY_IMAGE_TAG=2.60.0-py311-cpu

FROM rayproject/ray:${RAY_IMAGE_TAG} AS build
USER root
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mlaas4hep ./mlaas4hep
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

FROM rayproject/ray:${RAY_IMAGE_TAG}
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends xrootd-client \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV TF_USE_LEGACY_KERAS=1 \
    RAY_AUTH_MODE=token \
    MLAAS4HEP_HOME=/home/ray/.mlaas4hep
# The Ray image's unprivileged user.
USER ray
WORKDIR /home/ray
EXPOSE 8000 8265 6379
CMD ["mlaas4hep", "--help"]
