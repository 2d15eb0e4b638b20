# The stream worker image: runtime dependencies only (no torch), the shipped model packages included.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY worker ./worker
COPY training ./training
COPY models ./models
RUN pip install --no-cache-dir .
USER 65534
EXPOSE 9108
ENTRYPOINT ["sentiment"]
CMD ["worker"]
