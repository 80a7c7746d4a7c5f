# syntax=docker/dockerfile:1
# The crawler as an image: `docker build -t crawler .`, then `docker run --rm crawler --help`.
#
# The build stage installs the project into a virtual environment, not editable: migrations and
# the default config ship as data files under /opt/crawler/share/crawler, where
# crawler.settings.project_dir finds them. The final stage copies only that environment onto the
# same slim base (same Python, same paths), adds no compiler or package cache, and runs as a
# non-root user.
#
# No HEALTHCHECK here: the image runs one-shot commands (crawl, migrate, export, bench) whose
# exit code is their health; docker-compose.yml gives the long-running mock server its own.
#
# The base image is pinned to a patch release and a Debian release so that a rebuild gives the
# same Python; raise it deliberately (all wheels the project needs exist for manylinux x86_64
# and aarch64, so no build tools are needed in either stage).
ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Extras to install: parquet brings pyarrow for `crawler export --format parquet`;
# build with --build-arg EXTRAS= for a smaller image without it.
ARG EXTRAS=parquet
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/crawler
COPY pyproject.toml README.md ./
COPY crawler ./crawler
COPY config ./config
COPY migrations ./migrations
RUN /opt/crawler/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && /opt/crawler/bin/crawler --help > /dev/null \
    && test -f /opt/crawler/share/crawler/migrations/001_initial.sql \
    && test -f /opt/crawler/share/crawler/config/default.toml

FROM ${PYTHON_IMAGE}
# /data: inputs, mounted read-only; /home/crawler/jobs: the working directory, where outputs
# and generated files go (a volume in docker-compose.yml).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin crawler \
    && mkdir -p /data /home/crawler/jobs \
    && chown crawler:crawler /home/crawler/jobs
COPY --from=build /opt/crawler /opt/crawler
ENV PATH=/opt/crawler/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRAWLER_HOME=/home/crawler/data
USER 10001:10001
WORKDIR /home/crawler/jobs
ENTRYPOINT ["crawler"]
CMD ["--help"]
