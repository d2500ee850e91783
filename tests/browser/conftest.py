"""
A real cluster (registry, 3 nodes, gateway: separate twistd processes on free loopback ports)
and Debian's chromium, headless, driven by selenium through Debian's chromedriver.

The browser reaches 127.0.0.1 only: no proxy, every other host name fails to resolve, and
its background traffic (updates, sync, first-run pings) is off. Both processes end with the
module, whatever happened. Without chromium or chromedriver the tests skip, saying why, unless
C{KVD_REQUIRE_BROWSER} is set (.ci/run sets it, after installing them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvd.testing.processes import Cluster, Processes

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NODE_IDS = ("node-a", "node-b", "node-c")


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) and os.access(path, os.X_OK)):
            return f"{path} is absent: install Debian's {package} (.ci/run does, with apt-get)"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    ps = Processes(tmp_path_factory.mktemp("cluster"))
    try:
        yield ps.cluster(NODE_IDS)
    finally:
        ps.cleanup()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = _missing()
    if missing and os.environ.get("KVD_REQUIRE_BROWSER"):
        pytest.fail(f"{missing}; KVD_REQUIRE_BROWSER is set, so this does not skip")
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager stays out of it: the browser and the driver are given, and it is told offline.
    os.environ["SE_OFFLINE"] = "true"
    os.environ["SE_AVOID_STATS"] = "true"
    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--window-size=1280,1150",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    log = Path(profile) / "chromedriver.log"
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER, log_output=str(log)))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
