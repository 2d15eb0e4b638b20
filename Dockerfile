# Two images from one source (docker-compose.yml builds both):
#   runtime (the default, last stage): `pip install .`, no torch: the stream worker, the drift monitor, the
#            registry seed (deploy/compose/init_registry.py);
#   trainer: `pip install .[train]` (torch, transformers): `sentiment trainer`.
# The shipped model packages are copied to /opt/sentiment/models and SENTIMENT_MODELS_DIR points there, so every
# default model path (runtime/paths.py) resolves to them and never into site-packages. Both run as uid 10001.
# tests/test_compose_stack.py replays these COPY lines, builds the wheel from them and runs every service.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    SENTIMENT_MODELS_DIR=/opt/sentiment/models
# The registry volume's mount point exists in the image, owned by the service user: a new named volume
# takes over its owner, so the services (not root) can write it.
RUN groupadd --system --gid 10001 sentiment \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent sentiment \
 && install -d -o 10001 -g 10001 /var/lib/sentiment/registry
WORKDIR /opt/sentiment/src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY runtime ./runtime
COPY worker ./worker
COPY drift ./drift
COPY training ./training
COPY cli ./cli
COPY models /opt/sentiment/models
COPY deploy/compose/init_registry.py /opt/sentiment/bin/init_registry.py

FROM base AS trainer
RUN pip install --no-cache-dir ".[train]" && rm -rf build ./*.egg-info
WORKDIR /opt/sentiment
USER 10001:10001
ENTRYPOINT ["sentiment"]
CMD ["trainer"]

FROM base AS runtime
RUN pip install --no-cache-dir . && rm -rf build ./*.egg-info
WORKDIR /opt/sentiment
USER 10001:10001
EXPOSE 9108 9109
ENTRYPOINT ["sentiment"]
CMD ["worker"]
