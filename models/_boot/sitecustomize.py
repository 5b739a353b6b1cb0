"""Run at start-up by Python processes whose PYTHONPATH holds this folder.

`models.shim.ensure_torchvision()` puts this folder on PYTHONPATH, so the
subprocesses vLLM starts on its own (model inspection, engine core) install the
same lazy torchvision shim as their parent. Then any other sitecustomize that
this file shadows is run, so nothing of the interpreter's own set-up is lost.
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
try:
    try:
        from models.shim import ensure_torchvision
    except ImportError:  # not installed as a package: the repository root is two levels up
        sys.path.append(os.path.dirname(os.path.dirname(_here)))
        from models.shim import ensure_torchvision
    ensure_torchvision()
except Exception as exc:  # start-up must never fail because of the shim
    print(f"weft sitecustomize: torchvision shim not installed: {exc!r}", file=sys.stderr)

for _entry in sys.path:
    _candidate = os.path.join(_entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(_entry or os.getcwd()) != _here and os.path.isfile(_candidate):
        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _candidate)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
