# The crawler as an image: built in one stage, run from a slim one as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crawler ./crawler
COPY config ./config
COPY migrations ./migrations
RUN python -m venv /opt/crawler && /opt/crawler/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 crawler
COPY --from=build /opt/crawler /opt/crawler
ENV PATH=/opt/crawler/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CRAWLER_HOME=/home/crawler/data
USER crawler
WORKDIR /home/crawler
ENTRYPOINT ["crawler"]
CMD ["--help"]
