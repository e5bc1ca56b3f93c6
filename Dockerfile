# xvol on GPUs: PyTorch (CUDA 13.0) base matching the supported torch, DALI for the same CUDA.
#   docker build -t xvol .
#   docker run --gpus all --ipc=host -v /path/to/imagenet:/data/imagenet xvol \
#       torchrun --standalone --nproc_per_node=gpu scripts/train.py experiment=xresnet50_imagenet
FROM pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    XVOL_DATA=/data

WORKDIR /opt/xvol

# Dependencies first so code edits do not invalidate the heavy layer.
COPY setup.cfg pyproject.toml README.md ./
COPY xvol/__init__.py xvol/config.py xvol/
RUN pip install --no-cache-dir "nvidia-dali-cuda130==2.4.0" \
    && pip install --no-cache-dir -e .

COPY xvol ./xvol
COPY configs ./configs
COPY scripts ./scripts
COPY tools ./tools

RUN useradd --create-home --uid 1000 --shell /bin/bash xvol \
    && mkdir -p /data /opt/xvol/outputs /opt/xvol/results \
    && chown -R xvol:xvol /data /opt/xvol/outputs /opt/xvol/results
USER 1000:1000

CMD ["torchrun", "--standalone", "--nproc_per_node=gpu", "scripts/train.py", "--help"]
