# One image for publisher, bridge, consumer and the one-shot pki and setup services (docker
# compose). PYTHON_IMAGE: python:3.11-slim from a registry, or the image `make images` builds
# from Debian packages where none answers (it writes PYTHON_IMAGE into .env).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
COPY requirements.txt .
# The runtime part of requirements.txt only (the test tools stay out of the image).
RUN sed '/^# Tests/,$d' requirements.txt > /tmp/runtime.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/runtime.txt
COPY common/ common/
COPY stack/ stack/
COPY rabbitmq/ rabbitmq/
COPY publisher/ publisher/
COPY bridge/ bridge/
COPY consumer/ consumer/
USER nobody
