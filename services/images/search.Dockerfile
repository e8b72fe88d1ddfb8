# search: the encoder and FAISS (CPU).
# Build from the repository root:
#   docker build -f services/images/search.Dockerfile -t ghcr.io/aimesh/search:0.1.0 .

FROM python:3.12.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/aimesh
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
# The client package, then aimesh with this service's extra only.
# torch's CPU wheel: PyPI's default build drags in CUDA (GBs) for nothing.
RUN /opt/aimesh/bin/pip install ./protos ".[search]" \
        --extra-index-url https://download.pytorch.org/whl/cpu

FROM python:3.12.11-slim-bookworm
RUN groupadd --system --gid 10001 aimesh \
    && useradd --system --uid 10001 --gid aimesh --no-create-home --shell /usr/sbin/nologin aimesh
COPY --from=build /opt/aimesh /opt/aimesh
ENV PATH=/opt/aimesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AIMESH_SERVICE=search \
    AIMESH_HOST=0.0.0.0
USER 10001:10001
EXPOSE 50052 51052
ENTRYPOINT ["python", "-m", "aimesh_search"]
