# azure-drain-sidecar: `sidecar run` by default; `sidecar simulate` runs the IMDS/ARM simulator.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: dependencies from the hash-pinned lock, then the package as a wheel, built by the
# hash-pinned build backend in a venv of its own (pip would otherwise fetch hatchling unpinned)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY requirements.lock requirements-build.lock ./
RUN python -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --require-hashes --no-deps -r requirements.lock \
    && python -m venv /opt/build \
    && /opt/build/bin/pip install --require-hashes --no-deps -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN /opt/build/bin/pip wheel --no-build-isolation --check-build-dependencies --no-deps \
        --wheel-dir /wheels . \
    && /opt/sidecar/bin/pip install --no-deps /wheels/*.whl \
    && /opt/sidecar/bin/pip uninstall --yes pip setuptools \
    && /opt/sidecar/bin/python -m compileall -q -j 0 /opt/sidecar/lib
# The bytecode stays: the root is read-only at run time, and compiling the Azure SDKs' 8 MB of
# generated source on every start would cost 5 s of CPU and 300 MiB instead of 0.9 s and 105 MiB.

# --- runtime: the virtual environment only, as an unprivileged user
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid sidecar --no-create-home --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/sidecar \
    && chown sidecar:sidecar /var/lib/sidecar
COPY --from=build /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# The state file (SIDECAR_STATE_FILE default): drains and approvals must outlive the container.
VOLUME ["/var/lib/sidecar"]
# The load-balancer probe, /status and /metrics (SIDECAR_PORT default).
EXPOSE 8080
STOPSIGNAL SIGTERM
# Liveness only: a draining sidecar answers 503 on its probe and is perfectly healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["sidecar", "healthcheck"]
ENTRYPOINT ["sidecar"]
CMD ["run"]
