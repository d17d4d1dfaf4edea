# syntax=docker/dockerfile:1
# kubetune CPU image: the preflight, prepare_data, tokenize and register components, the scheduled
# `kubetune retrain` CronJob and the MLflow tracking server (kustomize/) run in it.
#
# Build from the repository root; `make images` does this with the tag from src/kubetune/images.py
# (the only place the tag is written: tag = kubetune.__version__):
#   docker buildx build -f docker/cpu.Dockerfile --build-arg KUBETUNE_VERSION=<kubetune.__version__> \
#       -t <kubetune.images.CPU_IMAGE> .
# The build context is cut down by cpu.Dockerfile.dockerignore beside this file (BuildKit).
#
# Versions: every third-party distribution is pinned by requirements.lock, the file CI installs
# from. torch comes first, from the PyTorch CPU index, where the lock's torch==X pin matches the
# X+cpu build; PyPI's Linux x86_64 wheel of the same version is a CUDA build, gigabytes larger.
# docker/README.md has the details.

ARG PYTHON_IMAGE=python:3.11-slim-trixie

# ---- wheel: the kubetune wheel of this checkout, and the list of what it requires -------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
COPY docker/wheel_requirements.py /usr/local/bin/
# The machine's CA bundle, mounted into the build, where PyPI is reached through a TLS-inspecting
# proxy (make images-local passes it); empty by default, never written into the image.
ARG PIP_CERT=
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python /usr/local/bin/wheel_requirements.py /wheels/kubetune-*.whl --extra server > /wheels/requirements.txt

# ---- deps: a virtualenv with torch and everything kubetune requires, pinned by the lock --------
# It depends on requirements.lock and the wheel's requirement list only, so a code change reuses
# this layer (and the image's big layer) as it is.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY requirements.lock ./
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch without its dependencies from TORCH_INDEX_URL; they come from PyPI in the next step,
# where the lock pins them, so no other package is taken from the PyTorch index.
# Builds on a machine without that index (make images-local) take torch from a folder of wheels
# mounted into the build instead; PIP_CERT as in the wheel stage. Both empty by default.
ARG TORCH_FIND_LINKS=
ARG PIP_CERT=
RUN torch_pin="$(grep -E '^torch==[0-9][^+]*$' requirements.lock)" \
 && python -m venv /opt/venv \
 && if [ -n "${TORCH_FIND_LINKS}" ]; then \
        /opt/venv/bin/pip install --no-deps --no-index --find-links "${TORCH_FIND_LINKS}" "${torch_pin}"; \
    else \
        /opt/venv/bin/pip install --no-deps --index-url "${TORCH_INDEX_URL}" "${torch_pin}"; \
    fi
COPY --from=wheel /wheels/requirements.txt ./
RUN /opt/venv/bin/pip install --constraint requirements.lock --requirement requirements.txt

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG KUBETUNE_VERSION
LABEL org.opencontainers.image.title="kubetune-cpu" \
      org.opencontainers.image.description="kubetune CPU stages, retrain CronJob and MLflow server" \
      org.opencontainers.image.version="${KUBETUNE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric non-root user (Kubernetes' runAsNonRoot can check a number, not a name). Home is
# group 0 writable too, for platforms that run images under an arbitrary uid in group 0.
RUN groupadd --gid 1000 kubetune \
 && useradd --uid 1000 --gid 1000 --home-dir /home/kubetune --create-home --shell /usr/sbin/nologin kubetune \
 && mkdir -p /home/kubetune/.cache/huggingface /home/kubetune/.kubetune \
 && chown -R 1000:0 /home/kubetune \
 && chmod -R g=u /home/kubetune

COPY --from=deps /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/kubetune \
    HF_HOME=/home/kubetune/.cache/huggingface \
    KUBETUNE_HOME=/home/kubetune/.kubetune \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The kubetune wheel, at the version the image is tagged with; then the whole environment is
# checked against the lock (and `pip check`), so a drifted or incomplete image fails to build.
# podman's layer cache keys this RUN by its text and arguments, not by what its mounts bring in,
# so make images-local passes a digest of everything the build reads; without it a changed wheel
# reused the layer that had installed the previous one (seen with podman 4.3). BuildKit tracks
# mounted content itself and needs no value here.
ARG KUBETUNE_BUILD_INPUTS=
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    --mount=type=bind,source=docker/check_lock.py,target=/tmp/check_lock.py \
    test -n "${KUBETUNE_VERSION}" || { echo "build with --build-arg KUBETUNE_VERSION=<kubetune.__version__> (make images does)" >&2; exit 1; } \
 && pip install --no-cache-dir --no-deps /wheels/kubetune-*.whl \
 && pip check \
 && python /tmp/check_lock.py /tmp/requirements.lock --kubetune-version "${KUBETUNE_VERSION}" \
 && python -c "import kubetune.components, kubetune.pipelines, torch, psycopg2; print('torch', torch.__version__)"

WORKDIR /home/kubetune
USER 1000:1000
CMD ["kubetune", "--help"]
