# The top-level kernels/ folder is installed as c2i_fast.kernels (no top-level `kernels` module).
from setuptools import setup

setup(
    packages=["c2i_fast", "c2i_fast.kernels"],
    package_dir={"c2i_fast": "c2i_fast", "c2i_fast.kernels": "kernels"},
)
