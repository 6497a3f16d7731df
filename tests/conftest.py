"""Test-wide settings: compile fast.

Most of the suite's time is XLA compiling small programs on 2 CPU cores. Backend optimisation level
0 and the classic CPU fusion emitters cut that about 7x. Every comparison in a test runs programs
compiled with the same flags (AR vs speculative, kernel vs reference, sharded vs single device), so
nothing is compared across settings. Speed is measured by launch/benchmark.py, never here.
Subprocesses inherit XLA_FLAGS; tests that set their own device count append to it. They also
inherit a PYTHONPATH that starts with this checkout, so the launch scripts and snippets they run
import the package under test, not one that `pip install -e` made from another checkout.

With FLEXDRAFT_DEFAULT_XLA=1 the flags are left as they are: tests/test_default_xla.py runs a
smoke set that way, compiled as users' programs are.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != ROOT:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
# Tests compile into no persistent cache (tests of the cache set their own directory).
os.environ.setdefault("FLEXDRAFT_JAX_COMPILATION_CACHE", "none")
DEFAULT_XLA_ENV = "FLEXDRAFT_DEFAULT_XLA"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if not os.environ.get(DEFAULT_XLA_ENV) and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
