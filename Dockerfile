# syntax=docker/dockerfile:1
# ca-daemon: build wheels in one stage, install them into a clean venv in a slim image
# without compilers, run as a numeric non-root UID.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ca_daemon ./ca_daemon
# The package and every dependency as wheels (binary wheels where PyPI has them).
RUN python -m pip wheel --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/ca-daemon/bin:$PATH
COPY --from=build /wheels /wheels
# No index, no compiler: only the wheels built above. The venv stays owned by root.
RUN python -m venv /opt/ca-daemon \
    && /opt/ca-daemon/bin/pip install --no-index --find-links=/wheels ca-daemon \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 ca-daemon \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/ca-daemon \
       --no-create-home --shell /usr/sbin/nologin ca-daemon \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/ca-daemon
USER 10001:10001
WORKDIR /var/lib/ca-daemon
VOLUME ["/var/lib/ca-daemon"]
EXPOSE 8080
ENTRYPOINT ["ca-daemon"]
CMD ["run"]
