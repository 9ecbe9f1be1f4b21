"""The GPU kit's cut of vLLM 0.32.0 (not the vLLM package): the pure-Python modules that
``PyNcclCommunicator`` and ``StatelessProcessGroup`` import, copied unchanged from the installed
vLLM by ``tests/gpu/kit/build_kit.py``, plus stand-ins for the modules that pull in the compiled
extension or the engine (this file, ``platforms``, ``distributed/__init__``,
``utils/network_utils``, ``utils/system_utils``). See MANIFEST.json in the built kit."""
from .version import __version__, __version_tuple__  # noqa: F401

KIT_CUT = True
