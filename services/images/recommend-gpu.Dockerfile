# recommend, GPU: the Torch recommender on an NVIDIA GPU (CUDA 12.8, CUDA torch).
# Build from the repository root:
#   docker build -f services/images/recommend-gpu.Dockerfile -t ghcr.io/aimesh/recommend-gpu:0.1.0 .

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build
# The CUDA tag pins the Ubuntu release; within it, take its current Python 3.12.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/aimesh
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
# torch built for CUDA 12.8 from PyTorch's index; the pin in the extra still holds.
RUN /opt/aimesh/bin/pip install ./protos ".[recommend]" \
        --extra-index-url https://download.pytorch.org/whl/cu128

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 aimesh \
    && useradd --system --uid 10001 --gid aimesh --no-create-home --shell /usr/sbin/nologin aimesh
COPY --from=build /opt/aimesh /opt/aimesh
ENV PATH=/opt/aimesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AIMESH_SERVICE=recommend \
    AIMESH_HOST=0.0.0.0 \
    AIMESH_RECOMMEND_DEVICE=cuda
USER 10001:10001
EXPOSE 50053 51053
ENTRYPOINT ["python", "-m", "aimesh_recommend"]
