# streamrec image: the `streamrec` CLI; by default it runs a stream worker.
#
#   docker build -t streamrec .
#   docker run --rm -e STREAMREC_KAFKA__BOOTSTRAP=... -e STREAMREC_REDIS__URL=... streamrec
#
# Usually started by docker-compose.yml, which supplies that environment and the
# healthchecks (`streamrec health --role <role> --here`, a different role per service, so
# the image declares no HEALTHCHECK of its own).

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# In a container, /metrics must listen on the container's interface (the default, 127.0.0.1,
# is unreachable from a scraper). It stays off until STREAMREC_METRICS__PORT is set
# (docker-compose.yml: worker 9101, serve 9102, trainer 9103).
ENV STREAMREC_METRICS__HOST=0.0.0.0

# pyproject.toml pins torch==2.13.0. On PyPI the Linux wheel of that version is the CUDA
# build, which pulls several GB of nvidia-* packages a CPU-only worker never uses. The
# PyTorch CPU index serves 2.13.0+cpu; `==2.13.0` matches it (the local label is ignored
# by the pin) and pip prefers it over plain 2.13.0, so adding the index as an *extra* one
# yields the CPU build while every other package still comes from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# libgomp1: LightGBM's wheel links the system OpenMP runtime, which -slim lacks
# (torch and faiss-cpu bundle their own).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, in their own layer, so that editing the code does not download
# torch again: the list is read from pyproject.toml, which alone invalidates this layer.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (dependencies are already satisfied, so this only builds streamrec): the
# streamrec/ folder and the layer folders, installed as the one package `streamrec`.
COPY streamrec ./streamrec
COPY streams ./streams
COPY models ./models
COPY serving ./serving
COPY infra ./infra
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" . \
    && rm -rf build *.egg-info

# Run unprivileged. Nothing is written under /app: the worker keeps Faust's data
# directory under /tmp, and state lives in Redis.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin streamrec
USER streamrec

ENTRYPOINT ["streamrec"]
CMD ["worker"]
