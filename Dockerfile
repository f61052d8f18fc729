# wbmri service image. CPU by default; for a GPU build:
#   docker build --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t wbmri:cuda .
#   docker run --gpus all -p 8000:8000 -e WBMRI_API_KEYS=secret wbmri:cuda serve --host 0.0.0.0 --device cuda
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 WBMRI_DATA_DIR=/var/lib/wbmri WBMRI_PORT=8000

RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY inference ./inference
COPY service ./service
COPY configs ./configs
RUN pip install . && useradd --system --home /var/lib/wbmri wbmri && mkdir -p /var/lib/wbmri && chown wbmri /var/lib/wbmri

USER wbmri
EXPOSE 8000
VOLUME ["/var/lib/wbmri"]
# the port is WBMRI_PORT for both the service and this check: `docker run -e WBMRI_PORT=9000 -p 9000:9000 ...`
HEALTHCHECK CMD python3 -c "import os,urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WBMRI_PORT', '8000')).status != 200)"
ENTRYPOINT ["wbmri"]
CMD ["serve", "--host", "0.0.0.0"]
