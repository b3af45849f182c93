# The image the manifests in cluster/ run: Ray's official image plus this package, installed from a
# wheel built here, and the entrypoints and configs a RayJob runs (in /app, its working_dir).
#
#   docker build -t optical-ray:0.1.0 .
#   docker build --build-arg VARIANT=-gpu --build-arg EXTRAS=gpu \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t optical-ray:0.1.0-gpu .
#
# Push it to your registry and put its digest (name@sha256:...) in cluster/kuberay/*.yaml, so every
# node runs exactly the image that was tested.
ARG RAY_VERSION=2.60.0
ARG VARIANT=

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY optical_ray ./optical_ray
RUN pip install --no-cache-dir build==1.2.2 && python -m build --wheel --outdir /wheels

FROM rayproject/ray:${RAY_VERSION}-py311${VARIANT}
ARG EXTRAS=cpu,onnx
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# torch first, from the index that matches the variant; the constraint keeps every later
# dependency from swapping it for another build.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /tmp/torch.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir -c /tmp/torch.txt "$(ls /wheels/*.whl)[${EXTRAS}]" \
    && optical-ray --help > /dev/null
WORKDIR /app
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users serve ./serve
