"""The operator's page (``GET /``) in a real headless Chromium against the real aggregator: what it says before the
federation exists, the configuration, rounds and devices it lists, the metrics chart it draws, and that device names
stay text."""

import html
import re
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
from matplotlib.image import imread

from .server import admin_headers
from .test_aggregator_http import enroll, payload, setup_federation, tensors

# The page's first two line colours (PALETTE in aggregator/static/operator.html); the metric keys sort in this order.
LINE_COLOURS = {"train_loss": (214, 39, 40), "valid_loss": (31, 119, 180)}
EVIL = '<script>document.title="pwned"</script><img src=x onerror="document.body.dataset.pwned=1">'


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium and no apt-get to install it with")
    pytest.fail("chromium not found: run scripts/setup.sh (it installs Debian's chromium package)")


def browse(url: str, profile, *args: str) -> str:
    """Load ``url`` in headless Chromium, let its scripts run for 5 s of virtual time; returns stdout."""
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1200,900",
           "--virtual-time-budget=5000", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def run_round(url: str, number: int, devices: list[dict], losses: list[tuple[float, float]]) -> None:
    for headers, (train, valid) in zip(devices, losses):
        body = payload(tensors(float(number)), tokens=100 * number,
                       metrics={"train_loss": train, "valid_loss": valid})
        r = httpx.post(f"{url}/rounds/{number}/update", headers=headers, content=body)
        assert r.status_code == 200, r.text
    deadline = time.time() + 15
    while httpx.get(url + "/status").json()["current_round"]["round"] == number:
        assert time.time() < deadline, f"round {number} did not close"
        time.sleep(0.05)


def test_operator_page_in_a_real_browser(server, tmp_path):
    url = server.url
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "://" not in page.text and " src=" not in page.text  # nothing loaded from elsewhere
    assert "[/](/)" in httpx.get(url + "/openapi.json").json()["info"]["description"]

    # Before the federation exists: a friendly explanation, no dashboard.
    dom = browse(url + "/", tmp_path / "profile", "--dump-dom")
    assert '<section id="empty" class="card empty">' in dom and "No federation yet" in dom
    assert '<div id="dashboard" class="hidden">' in dom

    secret = setup_federation(url, min_devices=2)
    devices = [enroll(url, secret, "edge-phone-nl"), enroll(url, secret, EVIL)]
    enroll(url, secret, "old-phone")  # retired before round 1: no round waits for it, the page says so
    assert httpx.delete(url + "/admin/devices/3", headers=admin_headers()).status_code == 200
    run_round(url, 1, devices, [(3.6, 3.3), (3.4, 3.1)])
    run_round(url, 2, devices, [(2.8, 2.6), (2.6, 2.4)])
    listed = httpx.get(url + "/status/devices").json()
    assert [d["last_round"] for d in listed] == [2, 2, None] and all("token" not in k for d in listed for k in d)

    dom = browse(url + "/", tmp_path / "profile", "--dump-dom")
    assert '<dd data-field="Base model">tiny-llama</dd>' in dom
    assert "edge-phone-nl" in dom and '<tr data-round="1">' in dom and '<tr data-round="2">' in dom
    assert 'class="retired"' in dom and "old-phone (retired)" in dom
    assert dom.count('<td class="num">2 / 2</td>') == 2  # both rounds waited for the two active devices only
    assert 'data-series="2" data-points="4"' in dom  # two metrics over two closed rounds
    # The hostile name is shown as text: escaped in the DOM, nothing parsed from it, nothing run.
    assert html.escape(EVIL, quote=False) in dom
    assert "<img" not in dom and "data-pwned" not in dom and "<title>CoMiGS aggregator</title>" in dom

    shot = tmp_path / "operator.png"
    browse(url + "/", tmp_path / "profile", f"--screenshot={shot}")
    rgb = (imread(shot)[..., :3] * 255).round().astype(int)  # (H, W, 3)
    assert rgb.shape[:2] == (900, 1200)
    for metric, colour in LINE_COLOURS.items():
        # A line across the chart, not just its legend swatch (14 px): the colour spans hundreds of columns.
        ys, xs = np.nonzero(np.abs(rgb - np.array(colour)).max(axis=-1) <= 12)
        assert len(xs) > 500, (metric, len(xs))
        assert np.unique(xs).size > 300 and ys.max() - ys.min() > 20, (metric, np.unique(xs).size)


def test_a_failed_round_shows_its_reason(server, tmp_path):
    url = server.url
    secret = setup_federation(url, min_devices=1)
    devices = [enroll(url, secret, "edge-phone-de")]
    blocker = server.data_dir / "blobs" / "globals" / "v000001.safetensors"
    blocker.mkdir(parents=True)  # the new global cannot be written: the round fails for real
    body = payload(tensors(1.0), metrics={"valid_loss": 3.0})
    assert httpx.post(f"{url}/rounds/1/update", headers=devices[0], content=body).status_code == 200
    deadline = time.time() + 15
    while (failure := httpx.get(url + "/status").json()["current_round"]["failure"]) is None:
        assert time.time() < deadline, "round 1 did not fail"
        time.sleep(0.05)
    dom = browse(url + "/", tmp_path / "profile", "--dump-dom")
    badges = re.findall(r'<span class="badge failed" title="([^"]*)">failed</span>', dom)
    assert len(badges) == 2  # the current round's card and its row in the rounds table
    assert all(html.unescape(b) == failure for b in badges) and "IsADirectoryError" in failure
