"""The one thing pyproject.toml cannot say without warnings: pvbus's optional C extension.

``pvbus.virtio._fastring`` runs the split ring's hot loop; it is optional (``optional=True``):
without a C compiler and Python headers the build goes on and pvbus runs the same loop in
Python (``pvbus.virtio.split.FAST_RING`` says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pvbus.virtio._fastring",
            ["src/pvbus/virtio/_fastring.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
