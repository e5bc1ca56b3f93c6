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

# Dependencies first (read from setup.cfg) so code edits do not invalidate the heavy layer.
COPY setup.cfg ./
RUN python -c "import configparser as c; p = c.ConfigParser(); p.read('setup.cfg'); \
print(p['options']['install_requires'])" > /tmp/requirements.txt \
    && pip install --no-cache-dir "nvidia-dali-cuda130==2.4.0" -r /tmp/requirements.txt

# Then xvol itself, a regular (not editable) install: the package carries its configs/, and
# scripts/ and tools/ are launchers of the installed commands (xvol-train, xvol-reparam, ...).
COPY pyproject.toml README.md ./
COPY xvol ./xvol
COPY configs ./configs
COPY scripts ./scripts
COPY tools ./tools
RUN pip install --no-cache-dir --no-deps .

RUN useradd --create-home --uid 1000 --shell /bin/bash xvol \
    && mkdir -p /data /opt/xvol/outputs /opt/xvol/results \
    && chown -R xvol:xvol /data /opt/xvol/outputs /opt/xvol/results
USER 1000:1000

CMD ["torchrun", "--standalone", "--nproc_per_node=gpu", "scripts/train.py", "--help"]
