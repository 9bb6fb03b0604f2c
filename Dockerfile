# One image for every role of a deployment (docker-compose.yml): the migration, the API,
# the dispatcher, and Ray's head and worker nodes.
#
# CUDA: PyPI's torch wheel for Linux x86_64 is a CUDA build that carries its own CUDA
# runtime and cuDNN, so the image needs no CUDA toolkit; on a GPU host the NVIDIA
# Container Toolkit mounts the driver (`deploy.resources.reservations.devices` in compose).
# The same image runs on CPU-only nodes. A smaller CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# A different base (e.g. an nvidia/cuda image with Python 3.11): --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 unroll \
    && mkdir -p /data/artifacts \
    && chown unroll:unroll /data/artifacts
WORKDIR /app

# torch first, in its own layer: it is most of the image and changes least.
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple -c constraints.txt torch==2.13.0

COPY pyproject.toml README.md alembic.ini ./
COPY migrations ./migrations
COPY trainer ./trainer
COPY service ./service
COPY workers ./workers
COPY examples ./examples
# Editable, as in development: `unroll db upgrade` finds alembic.ini and migrations/ beside
# the packages (service/store/db/migrate.py).
RUN pip install -c constraints.txt -e . \
    && unroll --help > /dev/null

USER unroll
ENV UNROLL_ARTIFACTS=/data/artifacts
# Each compose service names its own command; this one only shows what there is.
CMD ["unroll", "--help"]
