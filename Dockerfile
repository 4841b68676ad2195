# A Linux (CPU) image of the bot: the same image runs the gateway (musicgen-bot) and workers (musicgen-worker).
# On Apple silicon run workers natively instead: MLX uses Metal, which containers cannot reach.
FROM python:3.11-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev libopenblas0-pthread \
        ffmpeg libsndfile1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md setup.py ./
COPY core core
COPY bot bot
RUN pip install --no-cache-dir .
RUN useradd --create-home musicgen && mkdir -p /data/hf /data/clips && chown -R musicgen /data
USER musicgen
ENV DATABASE_PATH=/data/unused.sqlite3 FILES_DIR=/data/clips HF_HOME=/data/hf
CMD ["musicgen-bot"]
