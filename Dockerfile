# SynthBrain viewer on a CUDA runtime (falls back to CPU when no GPU is passed in).
#   docker build -t synthbrain .
#   docker run --gpus all -p 127.0.0.1:8501:8501 synthbrain      # then open http://localhost:8501
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 \
    PYVISTA_OFF_SCREEN=true VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow MPLBACKEND=Agg
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-pip libegl1 libgl1 libgl1-mesa-dri libxrender1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 synth
WORKDIR /app
COPY requirements.txt pyproject.toml README.md ./
COPY synth ./synth
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
# The VQ transformer's engine, pytorch-fast-transformers 0.4.0, compiles C++ at install (its setup
# imports torch: --no-build-isolation); the compiler and headers stay in this layer only. This
# runtime image has no nvcc, so only its CPU kernels are built and the model runs on the plain-torch
# engine on a GPU; build FROM a -devel CUDA image (with nvcc) to get its CUDA kernels too.
RUN apt-get update && apt-get install -y --no-install-recommends g++ python3-dev \
    && /opt/venv/bin/pip install --no-cache-dir --no-build-isolation pytorch-fast-transformers==0.4.0 \
    && apt-get purge -y g++ python3-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
COPY . .
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps -e . && chown -R synth /app
USER synth
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8501
HEALTHCHECK CMD python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8501/_stcore/health')"
# Inside the container the app must listen on all interfaces; publish it on 127.0.0.1 only (above).
CMD ["streamlit", "run", "viewer/app.py", "--server.address", "0.0.0.0", "--server.port", "8501", "--server.headless", "true"]
