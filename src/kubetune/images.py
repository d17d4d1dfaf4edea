"""The container images the components run in. Their tag is the package version, here and only
here, so a compiled pipeline can never point at an image holding different code."""

from kubetune import __version__

REGISTRY = "ghcr.io/kubetune"
CPU_IMAGE = f"{REGISTRY}/kubetune-cpu:{__version__}"
CUDA_IMAGE = f"{REGISTRY}/kubetune-cuda:{__version__}"
