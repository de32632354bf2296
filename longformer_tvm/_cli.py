"""The ``longformer-tvm`` console script: ``build_kernels.py``'s commands from an installed wheel.

``longformer-tvm build|tune|compare|selfcheck`` (and no command: the main job) runs the same
``main`` as ``python build_kernels.py`` in a checkout. A wheel carries ``build_kernels.py``,
``tvm_kernels/`` and ``benchmarks/`` under ``longformer_tvm/_build/``; building and tuning need the
``build`` extra (the TVM compiler's dependencies), checking and comparing only the package.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ._contract import BUILD_SCRIPT


def main(argv: list[str] | None = None) -> int:
    if not BUILD_SCRIPT.is_file():
        raise SystemExit(f"longformer-tvm: the build tools are missing from this installation "
                         f"({BUILD_SCRIPT} does not exist); reinstall longformer-tvm")
    spec = importlib.util.spec_from_file_location("build_kernels", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_kernels"] = module
    spec.loader.exec_module(module)
    os.environ.setdefault("TVM_LOG_DEBUG", "0")
    return module.main(argv)
