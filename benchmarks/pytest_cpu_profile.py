"""A pytest plugin that writes each test's wall time and CPU time, for finding what makes the suite slow.

    PYTHONPATH=benchmarks PYTEST_ADDOPTS="-p pytest_cpu_profile" CPU_PROFILE=ci-time.tsv bash .ci/run

One tab-separated line per test, written when it finishes: seconds since the session started, the test's wall time
(setup, call and teardown), the CPU time of the pytest process and of its children that finished and were waited
for during the test (`resource.getrusage`; a background process counts towards the test that reaps it), the test.
"""
import os
import resource
import time

_PATH = os.environ.get("CPU_PROFILE", "cpu-profile.tsv")
_T0 = time.time()
_started: dict = {}


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = (time.time(), *_cpu())


def pytest_runtest_logfinish(nodeid, location):
    t, me, kids = _started.pop(nodeid)
    now, (me2, kids2) = time.time(), _cpu()
    with open(_PATH, "a") as f:
        f.write(f"{now - _T0:.0f}\t{now - t:.1f}\t{me2 - me:.1f}\t{kids2 - kids:.1f}\t{nodeid}\n")
