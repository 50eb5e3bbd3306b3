# One image for publisher, bridge, consumer and the one-shot topology setup (docker compose).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY common/ common/
COPY stack/ stack/
COPY rabbitmq/ rabbitmq/
COPY publisher/ publisher/
COPY bridge/ bridge/
COPY consumer/ consumer/
USER nobody
