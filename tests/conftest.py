import os
import subprocess
import sys
import time

# No network here: make every hub lookup fail fast instead of retrying for minutes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny SD 1.x-style pipeline saved with save_pretrained (random weights)."""
    from fastunlearn.testing import tiny_sd_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    """A tiny SDXL-style pipeline (two text encoders, text_time conditioning) saved with save_pretrained."""
    from fastunlearn.testing import tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_sdxl_pipeline().save_pretrained(path)
    return path


# The real digits world takes about 20 minutes to build on 2 CPU cores. When a run collects tests that need it and
# it is not in the cache, it is built in a background process (one thread) while the tests that do not need it run
# first; the tests that do (the `digits_world` fixture) are moved to the end, in their order. The fixture then waits
# for the background process, or builds the world itself if the background build failed.
_PREBUILD = """
import signal, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # exit through `finally`: no temporary folder left behind
from fastunlearn.worlds.digits.clip import ensure_clip
from fastunlearn.worlds.digits.world import ensure_world
ensure_clip(ensure_world())
"""
_MIN_TESTS_BEFORE = 20  # fewer tests to overlap with: the fixture builds at full speed instead


def _needs_world(item) -> bool:
    return "digits_world" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_needs_world)  # stable: the order within both groups is kept


def pytest_collection_finish(session):
    config = session.config
    if config.option.collectonly or os.environ.get("FASTUNLEARN_TEST_PREBUILD", "1") == "0":
        return
    before = next((i for i, item in enumerate(session.items) if _needs_world(item)), None)
    if before is None or before < _MIN_TESTS_BEFORE:
        return
    from fastunlearn.worlds.digits.world import world_path, world_problem

    if world_problem(world_path()) is None:
        return
    log = config._tmp_path_factory.getbasetemp() / "digits-world-prebuild.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_MININTERVAL": "30"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", _PREBUILD], stdout=f, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    config._digits_prebuild = {"proc": proc, "log": log, "start": time.time()}
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fastunlearn: building the digits world in the background while the {before} tests "
                            f"that do not need it run (log: {log})")


def pytest_sessionfinish(session, exitstatus):
    pre = getattr(session.config, "_digits_prebuild", None)
    if pre is not None and pre["proc"].poll() is None:  # stopped early (-x, Ctrl-C): do not leave a build running
        pre["proc"].terminate()
        pre["proc"].wait(timeout=60)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    pre = getattr(config, "_digits_prebuild", None)
    if pre is not None and "waited" in pre:
        terminalreporter.write_line(
            f"fastunlearn: the digits world was built in the background (exit code {pre['proc'].returncode}); "
            f"the first test that needed it started {pre['first_use']:.0f} s after the build began and waited "
            f"{pre['waited']:.0f} s for it")


@pytest.fixture(scope="session")
def digits_world(request):
    """The real digits world from the cache ($FASTUNLEARN_CACHE), built on first use (minutes)."""
    from fastunlearn.worlds.digits import load_world

    pre = getattr(request.config, "_digits_prebuild", None)
    t0 = time.time()
    if pre is not None:
        pre["first_use"] = t0 - pre["start"]
        if pre["proc"].wait() != 0:  # the fixture builds it below; say why the background build did not
            tail = pre["log"].read_text(errors="replace")[-2000:]
            print(f"fastunlearn: the background build of the digits world failed ({pre['proc'].returncode}):\n{tail}")
        pre["waited"] = time.time() - t0
    return load_world()


# Settings that make a run on the tiny fixtures take seconds (tests import them from fastunlearn.testing, never
# from conftest: a full run resolves `conftest` to tests/kernels/conftest.py)
from fastunlearn.testing import SMALL  # noqa: E402


@pytest.fixture()
def base_args(tiny_sd_path, tmp_path):
    """Command-line arguments of a tiny run: the tiny SD fixture, two forget and two retain prompts."""
    (tmp_path / "forget.txt").write_text("a photo of cat\na painting of cat\n")
    (tmp_path / "retain.txt").write_text("a photo of dog\na photo of car\n")
    return ["--model", str(tiny_sd_path), "--forget-prompts", str(tmp_path / "forget.txt"),
            "--retain-prompts", str(tmp_path / "retain.txt"), *SMALL]
