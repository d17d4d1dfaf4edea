# syntax=docker/dockerfile:1
# kubetune CUDA image: the prepare_model, train and evaluate components run in it, on GPU nodes.
#
# Build from the repository root; `make images` does this with the tag from src/kubetune/images.py
# (the only place the tag is written: tag = kubetune.__version__):
#   docker buildx build -f docker/cuda.Dockerfile --build-arg KUBETUNE_VERSION=<kubetune.__version__> \
#       -t <kubetune.images.CUDA_IMAGE> .
# The build context is cut down by cuda.Dockerfile.dockerignore beside this file (BuildKit).
#
# Versions: every third-party distribution is pinned by requirements.lock, the file CI installs
# from, plus docker/cuda.lock for the CUDA libraries the CUDA torch wheel adds (nvidia-*, cuda-*,
# triton), which a lock frozen from a CPU environment cannot list. torch comes first, from
# TORCH_INDEX_URL, at the lock's torch==X pin: on PyPI (the default) that Linux x86_64 wheel is
# a CUDA build (torch 2.13.0: CUDA 13.0, so GPU nodes need an NVIDIA driver >= 580). For another
# CUDA build pass e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 after
# regenerating docker/cuda.lock for it (docker/lock_cuda.py). docker/README.md has the details.
# No CUDA base image: the wheels bring CUDA's user-space libraries, the node brings the driver.

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
 && python /usr/local/bin/wheel_requirements.py /wheels/kubetune-*.whl > /wheels/requirements.txt

# ---- deps: a virtualenv with CUDA torch and everything kubetune requires, pinned by the lock ---
# It depends on requirements.lock and the wheel's requirement list only, so a code change reuses
# this layer (several GB) as it is.
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /build
COPY requirements.lock docker/cuda.lock ./
ARG TORCH_INDEX_URL=https://pypi.org/simple
# torch without its dependencies from TORCH_INDEX_URL; they come from PyPI in the next step, pinned
# by both lock files, so nothing else is taken from another index. The check after it fails the
# build if torch is not a CUDA build.
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
RUN /opt/venv/bin/pip install --constraint requirements.lock --constraint cuda.lock --requirement requirements.txt \
 && /opt/venv/bin/python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
# Files nothing at run time loads, 0.27 GB of the image (6.35 -> 6.08 GB): C/C++ headers and
# static libraries of the CUDA and torch wheels (triton keeps its own headers: it compiles a
# launcher at run time), the multi-GPU cuSOLVER and the alternative NVRTC build, which no library in
# torch or bitsandbytes names (checked by scanning every shared object of the image for the names).
RUN site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && find "${site}/nvidia" "${site}/torch" -depth -type d \( -path '*/nvidia/*/include' -o -path '*/torch/include' \) \
        -exec rm -rf {} + \
 && find "${site}/nvidia" "${site}/torch" -type f \
        \( -name '*.a' -o -name 'libcusolverMg.so*' -o -name 'libnvrtc.alt.so*' \) -delete \
 && /opt/venv/bin/python -c "import torch, bitsandbytes"

# ---- runtime -----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG KUBETUNE_VERSION
LABEL org.opencontainers.image.title="kubetune-cuda" \
      org.opencontainers.image.description="kubetune GPU stages: prepare_model, train, evaluate" \
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
# NVIDIA_DRIVER_CAPABILITIES: the container toolkit mounts the driver's compute libraries (CUDA)
# besides nvidia-smi. NVIDIA_VISIBLE_DEVICES is left to the device plugin: set in an image it
# would hand every GPU of a node to pods that requested none.
ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    HOME=/home/kubetune \
    HF_HOME=/home/kubetune/.cache/huggingface \
    KUBETUNE_HOME=/home/kubetune/.kubetune \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The kubetune wheel, at the version the image is tagged with; then the whole environment is
# checked against the lock (and `pip check`), so a drifted or incomplete image fails to build.
# podman's layer cache keys this RUN by its text and arguments, not by what its mounts bring in,
# so make images-local passes a digest of everything the build reads; without it a changed wheel
# reused the layer that had installed the previous one (seen with podman 4.3). BuildKit tracks
# mounted content itself and needs no value here.
ARG KUBETUNE_BUILD_INPUTS=
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.lock,target=/tmp/requirements.lock \
    --mount=type=bind,source=docker/cuda.lock,target=/tmp/cuda.lock \
    --mount=type=bind,source=docker/check_lock.py,target=/tmp/check_lock.py \
    test -n "${KUBETUNE_VERSION}" || { echo "build with --build-arg KUBETUNE_VERSION=<kubetune.__version__> (make images does)" >&2; exit 1; } \
 && pip install --no-cache-dir --no-deps /wheels/kubetune-*.whl \
 && pip check \
 && python /tmp/check_lock.py /tmp/requirements.lock /tmp/cuda.lock --kubetune-version "${KUBETUNE_VERSION}" \
 && python -c "import kubetune.components, kubetune.pipelines, torch, bitsandbytes; print('torch', torch.__version__)"

WORKDIR /home/kubetune
USER 1000:1000
CMD ["kubetune", "--help"]
