# pwachat's container image: `docker build -t pwachat .` on any machine that reaches Docker Hub,
# PyPI and crates.io. `make image` builds this same file where none of them is reachable from a
# container, by naming local base images in the ARGs below and passing OFFLINE=1 (see docker/).
#
# Plain Dockerfile syntax (no RUN --mount, no heredocs), so the legacy builder and BuildKit both
# build it.

# The runtime base, and the builder's: the same Python, so that the venv made in the builder runs
# unchanged in the runtime stage (its interpreter is a symlink to the base's python3).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG BUILDER_IMAGE=python:3.11-slim-bookworm
# Only its toolchain is used (/usr/local/cargo and /usr/local/rustup, copied into the builder);
# the version the image is built and tested with here.
ARG RUST_IMAGE=rust:1.95-slim-bookworm

FROM ${RUST_IMAGE} AS rust

# ---------------------------------------------------------------------------------------------
FROM ${BUILDER_IMAGE} AS builder
# OFFLINE=1: install only from what `make image` put in docker/offline/ (wheels/, vendor/), and
# never ask an index.
ARG OFFLINE=0
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    CARGO_TERM_COLOR=never \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    LANG=C.UTF-8

# A C compiler links the extension; the slim Python images have none (the local builder base has).
RUN if ! command -v cc >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY docker/offline/ /offline/
RUN if [ "$OFFLINE" = 1 ]; then \
        printf '[global]\nno-index = true\nfind-links = /offline/wheels\n' > /etc/pip.conf \
        && printf '[source.crates-io]\nreplace-with = "vendored"\n[source.vendored]\ndirectory = "/offline/vendor"\n[net]\noffline = true\n' \
            >> "$CARGO_HOME/config.toml"; \
    fi \
    && cargo --version && rustc --version && python3 --version

WORKDIR /src
# The build requirements (maturin) and the runtime dependencies, read from pyproject.toml, in
# their own layers: a source change rebuilds only the wheel.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
open('/tmp/build-requirements.txt', 'w').write('\n'.join(p['build-system']['requires']) + '\n'); \
open('/tmp/requirements.txt', 'w').write('\n'.join(p['project']['dependencies']) + '\n')" \
    && python3 -m venv /opt/build \
    && /opt/build/bin/pip install -q -r /tmp/build-requirements.txt \
    && python3 -m venv /opt/pwachat \
    && /opt/pwachat/bin/pip install -q -r /tmp/requirements.txt

COPY Cargo.toml Cargo.lock README.md ./
COPY rust ./rust
COPY python ./python
RUN /opt/build/bin/maturin build --release --locked --out /dist \
    && /opt/pwachat/bin/pip install -q --no-deps /dist/*.whl \
    && /opt/pwachat/bin/pip check \
    && /opt/pwachat/bin/pip uninstall -q -y pip setuptools \
    && /opt/pwachat/bin/python -c "import pwachat._native, pwachat.app"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="pwachat" \
      org.opencontainers.image.description="The backend a chat PWA talks to: OpenAI/Anthropic relay over JSON and SSE" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --gid 10001 pwachat \
    && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --home-dir /nonexistent \
        --shell /usr/sbin/nologin pwachat
COPY --from=builder /opt/pwachat /opt/pwachat

# HOST/PORT: listen on every interface of the container. LOG_FILE empty: JSON lines on stdout
# only, so the root file system may be read-only. The environment (or an --env-file) overrides any.
ENV PATH=/opt/pwachat/bin:$PATH \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=5000 \
    LOG_FILE=

# Empty, root-owned: nothing is written here. A .env mounted at /app/.env is read.
WORKDIR /app
# Numeric, so that an orchestrator's "run as non-root" check can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 5000
STOPSIGNAL SIGTERM
# No curl in the image: the venv's Python asks the liveness route on the port the server uses.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/api/health/live' % os.environ.get('PORT', '5000'), timeout=4)"]
CMD ["pwachat", "serve"]
