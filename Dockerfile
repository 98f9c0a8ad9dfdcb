# wsiats on a CUDA-enabled PyTorch base image. Build:
#   docker build -t wsiats .
# and run with a GPU:
#   docker run --gpus all -v "$PWD:/data" wsiats predict /data/slides --model /data/run --out /data/pred.csv
# BASE chooses the PyTorch image; a CPU-only image works too, e.g.
#   docker build --build-arg BASE=python:3.11-slim --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" .
ARG BASE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE}

# The PyTorch base already carries torch; TORCH_SPEC installs it on other bases.
ARG TORCH_SPEC=""
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /opt/wsiats
COPY pyproject.toml README.md LICENSE ./
COPY wsiats ./wsiats
RUN if [ -n "$TORCH_SPEC" ]; then pip install $TORCH_SPEC; fi \
 && pip install . \
 && wsiats --version

WORKDIR /data
ENTRYPOINT ["wsiats"]
CMD ["--help"]
