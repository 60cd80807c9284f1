# The Trainyard image: every process (gateway, handlers, projections, train node) runs from it.
# Build: docker build -t trainyard:latest .   (docker compose builds it for you)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# The pinned environment, installed as `make setup` does (mlagents declares Python 3.10 only and
# an old grpcio; it runs on 3.11 with the lock's pins). torch comes from the PyTorch CPU index:
# the same version, without the CUDA libraries.
COPY requirements.lock ./
RUN set -eux; \
    torch="$(grep -E '^torch==' requirements.lock)"; \
    grep -vE '^torch==' requirements.lock > /tmp/requirements.txt; \
    pip install --no-deps --ignore-requires-python -r /tmp/requirements.txt; \
    pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "$torch"; \
    rm /tmp/requirements.txt

# The project itself (no dependencies: they are all above).
COPY pyproject.toml README.md ./
COPY domain ./domain
COPY handlers ./handlers
COPY projections ./projections
COPY gateway ./gateway
COPY trainer ./trainer
COPY cli ./cli
RUN pip install --no-deps --no-build-isolation . && rm -rf build ./*.egg-info

# Runs as a user of its own; relative paths (var/runs, var/builds, ...) land in /data.
RUN useradd --create-home --uid 10001 trainyard \
    && mkdir -p /data \
    && chown trainyard:trainyard /data
USER trainyard
WORKDIR /data

EXPOSE 8000
CMD ["uvicorn", "gateway.app:app", "--host", "0.0.0.0", "--port", "8000"]
