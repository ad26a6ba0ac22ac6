# The Avatar Server on an NVIDIA GPU: the dispatcher, its session processes and the
# renderer process (onnxruntime-gpu or torch on CUDA) in one container.
#
#   docker build -t avatar-server .
#   docker run --gpus all --network host \
#       -e VIDEOSDK_API_KEY=... -e VIDEOSDK_SECRET_KEY=... -e AVATAR_SERVER_TOKEN=... \
#       avatar-server                       # extra flags go to 'avatar-server serve'
#
# Host networking lets WebRTC use the host's addresses for its UDP media ports.
# CUDA_IMAGE and TORCH_INDEX must name the same CUDA major version; the image's
# cuDNN 9 is what onnxruntime-gpu's CUDA 12 builds load.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The CUDA builds first: the project's own requirements are then already met.
RUN pip install --upgrade pip \
    && pip install torch --index-url "${TORCH_INDEX}" \
    && pip install "onnxruntime-gpu>=1.19"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY renderers ./renderers
COPY models ./models
RUN pip install ".[gpu]" \
    && python -c "import onnxruntime, torch; print(onnxruntime.get_available_providers(), torch.version.cuda)"

RUN useradd --create-home --uid 10001 avatar
USER avatar

# Inside a container the dispatcher must listen on all interfaces; joins and admin
# requests are then always authenticated (it refuses to start otherwise).
ENV AVATAR_SERVER_HOST=0.0.0.0 \
    AVATAR_SERVER_PORT=8089
EXPOSE 8089

HEALTHCHECK --interval=10s --timeout=3s --start-period=180s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['AVATAR_SERVER_PORT'], timeout=2)"

STOPSIGNAL SIGTERM
ENTRYPOINT ["avatar-server", "serve"]
