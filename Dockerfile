# RetinaNet training image: CUDA PyTorch base, the package installed, `retinanet` as entry point.
#   docker build -t retinanet .
#   docker run --gpus all --ipc=host -v $PWD/datasets:/workspace/datasets -v $PWD/output:/workspace/output \
#       retinanet train configs/retinanet_R50_FPN_1x.yaml
# Multi-GPU inside the container:
#   docker run --gpus all --ipc=host --entrypoint torchrun ... retinanet \
#       --nproc-per-node 8 -m retinanet train configs/retinanet_R50_FPN_1x.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /workspace

COPY pyproject.toml README.md ./
COPY retinanet ./retinanet
COPY configs ./configs
COPY tools ./tools
# torch and torchvision come with the base image; pip keeps them.
RUN pip install --no-cache-dir . && python -c "import retinanet, torchvision; print(retinanet.__version__)"

ENTRYPOINT ["retinanet"]
CMD ["--help"]
