"""
The dashboard at GET /ui in a real browser (headless chromium), against a live cluster: it
shows the cluster's node ids and the ring, a key lookup shows the key's owners and each
replica's version (a key holding markup shows as text), and a screenshot of it is not blank.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from kvd.testing.processes import Cluster, Processes, request

from .conftest import NODE_IDS
from .png import pixels

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.timeout(180)]

#: Where the screenshot is kept to be looked at.
SCREENSHOT = Path("/tmp/kvd-ui.png")
WAIT = 20


def wait_until(browser: Any, what: str, check: Any) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(lambda _: check())
    except TimeoutException:
        raise AssertionError(f"after {WAIT}s, not {what}; the page says:\n{text(browser)}") from None


def text(browser: Any) -> str:
    return str(browser.execute_script("return document.body.innerText"))


def read(browser: Any, script: str) -> Any:
    """What C{script} returns, read in one go (the page redraws every 2 s, so elements come and go)."""
    return browser.execute_script(script)


NODE_ROWS = (
    "return Array.from(document.querySelectorAll('#nodes tr[data-node]'))"
    ".map(r => [r.dataset.node, r.cells[0].textContent])"
)
ARCS = "return Array.from(document.querySelectorAll('#ring path.arc')).map(a => a.getAttribute('stroke'))"
LOOKUP = """
const owners = document.getElementById('owners');
if (!owners) return null;
return {
  owners: owners.textContent,
  key: document.getElementById('looked-up').textContent,
  markup: document.querySelectorAll('#lookup-result b').length,
  rows: Array.from(document.querySelectorAll('#replicas tbody tr')).map(
    r => [r.dataset.node].concat(Array.from(r.cells).map(c => c.textContent))),
};
"""


def open_dashboard(browser: Any, cluster: Cluster) -> None:
    browser.get(cluster.gateway.url + "/ui")
    wait_until(browser, "showing the nodes", lambda: len(read(browser, NODE_ROWS)) == 3)


def test_the_page_shows_the_live_clusters_nodes_and_ring(browser: Any, cluster: Cluster) -> None:
    open_dashboard(browser, cluster)
    assert browser.title == "kvd dashboard"
    assert read(browser, NODE_ROWS) == [[node, node] for node in NODE_IDS]
    strokes = read(browser, ARCS)
    assert len(strokes) > 3 and len(set(strokes)) == 3, "the ring is drawn as each node's arcs, one colour per node"
    legend = read(browser, "return document.getElementById('legend').textContent")
    assert all(node in legend for node in NODE_IDS), legend
    wait_until(browser, "live", lambda: "live" in read(browser, "return document.getElementById('status').textContent"))


def test_a_key_lookup_shows_its_owners_and_each_replicas_version(browser: Any, cluster: Cluster) -> None:
    key = "<b>bold</b> & 'key'"
    port = cluster.gateway.port
    assert port is not None
    status, written = request(port, "PUT", "/kv/" + quote(key, safe=""), b"v")
    assert status == 200, written
    owners = request(port, "GET", "/cluster/owners/" + quote(key, safe=""))[1]["nodes"]
    assert sorted(owners) == sorted(NODE_IDS)

    open_dashboard(browser, cluster)
    look_up(browser, key)
    shown = wait_until(browser, "showing the owners", lambda: read(browser, LOOKUP))
    assert shown["owners"] == ", ".join(owners)
    assert shown["key"] == key, "the key is shown as text, markup and all"
    assert shown["markup"] == 0, "nothing from the server became markup"
    assert [row[0] for row in shown["rows"]] == owners
    for row in shown["rows"]:
        assert row[3:] == ["owner", written["version"], "live"], row


NODE_FIGURES = (
    "return Array.from(document.querySelectorAll('#nodes tr[data-node]'))"
    ".map(r => [r.dataset.node, r.cells[2].textContent, r.cells[4].textContent, r.cells[5].textContent])"
)


def own_figures(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Each node's own GET /node answer, by its id."""
    answers = []
    for node in cluster.nodes:
        assert node.port is not None
        status, body = request(node.port, "GET", "/node")
        assert status == 200, body
        answers.append(body)
    return {body["id"]: body for body in answers}


def test_the_nodes_table_shows_each_nodes_key_count_repair_report_and_request_rate(
    browser: Any, cluster: Cluster
) -> None:
    """
    The keys, repair and requests/s columns come from /cluster (the page may ask nothing
    else: its CSP is connect-src 'self'): keys and repair as each node's GET /node says,
    requests/s differenced from the counter of requests the gateway sent the node.
    """
    port = cluster.gateway.port
    assert port is not None
    for i in range(25):
        assert request(port, "PUT", f"/kv/counted{i}", b"v")[0] == 200
    open_dashboard(browser, cluster)

    def as_each_node_says() -> Any:
        rows = read(browser, NODE_FIGURES)
        own = own_figures(cluster)
        expected = {}
        for node_id, body in own.items():
            report = body.get("rebalance")
            repair = "\u2014" if report is None else f"{report['sent']:,} / {report['keys_to_send']:,} sent"
            expected[node_id] = [f"{body['keys']:,}", repair]
        shown = {row[0]: row[1:3] for row in rows}
        return rows if shown == expected and all(body["keys"] >= 25 for body in own.values()) else None

    rows = wait_until(
        browser, "showing each node's key count and repair report as its GET /node says", as_each_node_says
    )
    assert sorted(row[0] for row in rows) == sorted(NODE_IDS)

    def rated() -> Any:
        request(port, "GET", "/kv/counted1")  # traffic to the nodes, so the rates have something to count
        rows = read(browser, NODE_FIGURES)
        return rows if all(re.fullmatch(r"[0-9][0-9,]*(\.[0-9])?", row[3]) for row in rows) else None

    rows = wait_until(browser, "showing each node's request rate as a number", rated)
    assert any(float(row[3].replace(",", "")) > 0 for row in rows), rows


def look_up(browser: Any, key: str) -> None:
    box = browser.find_element("id", "lookup-key")
    box.clear()
    box.send_keys(key)
    browser.find_element("css selector", "#lookup button").click()


def test_with_a_client_token_the_page_is_served_and_sends_the_token_it_is_given(
    browser: Any, cluster: Cluster, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("t0ken-for-the-ui\n")
    static = [f"--node={node.args[node.args.index('--node-id') + 1]}={node.url}" for node in cluster.nodes]
    processes = Processes(tmp_path)
    gateway = processes.gateway(*static, "--client-token-file", str(tmp_path / "token"))
    with processes, gateway:
        assert gateway.port is not None
        browser.get(gateway.url + "/ui")
        wait_until(browser, "showing the nodes", lambda: len(read(browser, NODE_ROWS)) == 3)
        look_up(browser, "guarded")
        error = "return (document.querySelector('#lookup-result .error-text') || {}).textContent"
        wait_until(browser, "asking for the token", lambda: "client token" in (read(browser, error) or ""))
        token = browser.find_element("id", "token")
        token.send_keys("t0ken-for-the-ui")
        browser.execute_script("document.getElementById('token').dispatchEvent(new Event('change'))")

        def versions_shown() -> Any:
            shown = read(browser, LOOKUP)
            return shown if shown and [row[5] for row in shown["rows"]] == ["does not hold it"] * 3 else None

        shown = wait_until(browser, "showing that no replica holds the key", versions_shown)
        assert shown["owners"] == ", ".join(request(gateway.port, "GET", "/cluster/owners/guarded")[1]["nodes"])
        assert read(browser, error) is None, "and no complaint about the token any more"


def test_a_screenshot_of_the_page_is_not_blank(browser: Any, cluster: Cluster, tmp_path: Path) -> None:
    port = cluster.gateway.port
    assert port is not None
    for i in range(20):
        request(port, "PUT", f"/kv/shot{i}", b"v")
    open_dashboard(browser, cluster)
    look_up(browser, "shot1")
    wait_until(browser, "showing a lookup", lambda: read(browser, LOOKUP))
    rate = "return document.getElementById('gateway-rate').textContent"
    wait_until(browser, "showing the gateway's request rate", lambda: not read(browser, rate).endswith("\u2014"))
    png = browser.get_screenshot_as_png()
    (tmp_path / "kvd-ui.png").write_bytes(png)
    shutil.copyfile(tmp_path / "kvd-ui.png", SCREENSHOT)
    width, height, colours = pixels(png)
    assert (width, height) > (600, 400)
    distinct = set(colours)
    assert len(distinct) > 16, f"the screenshot has {len(distinct)} colours: the page is blank"
    page = text(browser)
    assert all(node in page for node in NODE_IDS), page
