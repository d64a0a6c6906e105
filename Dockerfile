# One image for every mailbus service: `mailbus <service>` is the command.
#   docker build -t mailbus .
#   docker run --rm mailbus mailbus --help
# Dependencies come from requirements.lock, every one pinned and hashed.
# No secret is ever copied in: credentials are mounted at run time under
# /var/lib/mailbus/secrets (see docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/mailbus
COPY requirements.lock /tmp/requirements.lock
# google-api-python-client carries ~110 MB of discovery documents for every
# Google API; mailbus builds only the Gmail one, from the bundled document.
RUN /opt/mailbus/bin/pip install --require-hashes --no-deps -r /tmp/requirements.lock \
 && find /opt/mailbus/lib/python3.11/site-packages/googleapiclient/discovery_cache/documents \
        -type f ! -name 'gmail.v1.json' -delete
# The project goes in as a wheel, built here by the locked setuptools and
# wheel: the Avro schemas and SQL files travel inside it as package data, and
# no source tree is left in the image. pip compiles the installed modules.
COPY pyproject.toml README.md /src/
COPY schemas /src/schemas
COPY mailbus /src/mailbus
COPY services /src/services
RUN /opt/mailbus/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/dist /src \
 && /opt/mailbus/bin/pip install --no-deps --no-index /tmp/dist/mailbus-*.whl \
 && /opt/mailbus/bin/pip check \
 && rm -rf /tmp/dist

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mailbus" \
      org.opencontainers.image.description="Self-hosted email pipeline on Kafka: one image, every service" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, unprivileged uid (no login shell, no home of use), so that mounted
# secret files can be given to it.
RUN groupadd --gid 10001 mailbus \
 && useradd --no-log-init --no-create-home --uid 10001 --gid mailbus --home-dir /var/lib/mailbus \
        --shell /usr/sbin/nologin mailbus \
 && mkdir -p /var/lib/mailbus/secrets \
 && chown -R mailbus:mailbus /var/lib/mailbus && chmod 700 /var/lib/mailbus/secrets
COPY --from=build /opt/mailbus /opt/mailbus
COPY deploy/compose/healthcheck.py /usr/local/bin/mailbus-healthcheck
ENV PATH=/opt/mailbus/bin:$PATH \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    MAILBUS_VAR_DIR=/var/lib/mailbus \
    MAILBUS_HOST=0.0.0.0 \
    MAILBUS_METRICS_HOST=0.0.0.0
USER mailbus:mailbus
WORKDIR /var/lib/mailbus
# ingest 8080, hooks 8081, metrics 9101-9106
EXPOSE 8080 8081 9101 9102 9103 9104 9105 9106
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/mailbus-healthcheck"]
CMD ["mailbus", "ingest"]
