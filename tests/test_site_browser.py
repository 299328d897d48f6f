"""The offline site in a real browser: headless Chromium opens every page of the built site and checks what a reader sees.

Not part of the default run (it takes about a minute, more on a loaded machine): `make site-test` builds the
site and runs this with LMCOURSE_SITE_TEST=1. Chromium comes from Debian's `chromium` package; the set-up
installs it with apt-get when it is missing and we are root, and the test is skipped with the reason when
that is impossible. The browser is driven through the Chrome DevTools protocol on a local websocket
(`websocket-client`), so no webdriver is needed.

For each page: math typeset (MathJax elements present for every TeX source, no MathJax error, no raw `$...$`
left in the text), every image loaded (naturalWidth > 0), no console error (script errors, failed loads),
every link to a local file resolves (the file exists, and the `#anchor` exists in it). Screenshots of the
index and of one chapter (its top, and its first figure) are written to `<site>/screenshots/`.
"""
import base64
import html.parser
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("LMCOURSE_SITE", ROOT / "_site"))

pytestmark = pytest.mark.skipif(os.environ.get("LMCOURSE_SITE_TEST") != "1",
                                reason="browser test of the built site: run `make site-test`")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def ensure_chromium() -> str:
    "The Chromium binary; installed from Debian's packages when missing (as root); skips the test when impossible."
    found = find_chromium()
    if found: return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Chromium is not installed and cannot be installed here (needs apt-get as root): "
                    "install Debian's `chromium` package to run the browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"Chromium is not installed and `{' '.join(cmd)}` failed: {r.stderr.strip()[-400:]}")
    return find_chromium() or pytest.skip("apt-get installed chromium but no chromium binary is on the PATH")


class Browser:
    "Headless Chromium and one page, driven through the DevTools protocol; collects console errors per page."

    def __init__(self, binary: str, width: int = 1280, height: int = 1600):
        import websocket
        self.profile = tempfile.mkdtemp(prefix="lmcourse-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = Path(self.profile) / "DevToolsActivePort", time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not start (exit code {self.proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.errors = 0, []
        for domain in ("Page", "Runtime", "Log"): self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}".strip())

    def call(self, method: str, wait_event: str | None = None, **params) -> dict:
        "Send a command; return its result (and, with `wait_event`, wait for that event after it too)."
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        result, seen = None, wait_event is None
        while result is None or not seen:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg: raise RuntimeError(f"{method}: {msg['error']}")
                result = msg["result"]
            elif "method" in msg:
                self._event(msg)
                seen = seen or msg["method"] == wait_event
        return result

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r: raise RuntimeError(f"evaluating in the page: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str) -> None:
        self.errors = []
        self.call("Page.navigate", wait_event="Page.loadEventFired", url=url)

    def screenshot(self, path: Path, clip: dict | None = None) -> None:
        params = {"format": "png"} | ({"clip": {**clip, "scale": 1}, "captureBeyondViewport": True} if clip else {})
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))

    def close(self) -> None:
        if getattr(self, "ws", None): self.ws.close()
        self.proc.terminate()
        try: self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


# What the page reports about itself once MathJax has finished (its queue runs our callback last).
PAGE_REPORT = r"""
new Promise(done => {
  const report = () => {
    const skip = new Set(["PRE", "CODE", "SCRIPT", "STYLE", "TEXTAREA"]);
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    const raw = [];
    while (walker.nextNode()) {
      const node = walker.currentNode;
      let el = node.parentElement, inside = false;
      while (el) { if (skip.has(el.tagName) || el.classList.contains("MathJax_Preview")) { inside = true; break; } el = el.parentElement; }
      const t = node.textContent;
      if (!inside && (/\$\$|\\\(|\\\[/.test(t) || /\$[^$\s][^$]*\$/.test(t))) raw.push(t.trim().slice(0, 100));
    }
    done({
      mathjax: !!(window.MathJax && MathJax.Hub),
      tex_sources: document.querySelectorAll('script[type^="math/tex"]').length,
      rendered: document.querySelectorAll("span.MathJax, div.MathJax_Display, span.MathJax_CHTML, span.MathJax_SVG").length,
      math_errors: [...document.querySelectorAll(".MathJax_Error, merror")].map(e => e.textContent.slice(0, 100)),
      raw_math: raw,
      fonts: [...document.fonts].filter(f => f.status !== "unloaded").map(f => f.family + ":" + f.status),
      images: document.images.length,
      broken_images: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src.slice(0, 100)),
      links: [...document.querySelectorAll("a[href]")].map(a => a.href),
      sidebar_links: document.querySelectorAll("nav.lmc-sidebar a").length,
      first_figure: (() => { const i = [...document.images].find(i => i.src.startsWith("data:") && i.naturalWidth > 200);
        if (!i) return null; const r = i.getBoundingClientRect();
        return {x: 0, y: Math.max(0, r.top + window.scrollY - 80), width: 1280, height: Math.min(900, r.height + 160)}; })(),
    });
  };
  // after MathJax's queue, and after the fonts it asked for have loaded or failed (a failure is a console error)
  const settle = () => document.fonts.ready.then(() => setTimeout(report, 100));
  if (window.MathJax && MathJax.Hub) MathJax.Hub.Queue(settle); else settle();
})
"""


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        self.ids |= {v for k, v in attrs if k in ("id", "name") and v}


def page_ids(path: Path, cache: dict) -> set:
    if path not in cache:
        parser = _Ids()
        parser.feed(path.read_text(errors="replace"))
        cache[path] = parser.ids
    return cache[path]


@pytest.fixture(scope="module")
def browser():
    if not (SITE / "index.html").exists():
        pytest.fail(f"no site at {SITE}: build it first (`make site-test` does, or `python scripts/build_site.py`)")
    b = Browser(ensure_chromium())
    yield b
    b.close()


@pytest.fixture(scope="module")
def reports(browser):
    "Open every page of the site and collect its report; the index and the most math-heavy chapter get screenshots."
    shots = SITE / "screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir()
    found = {}
    for page in sorted(SITE.glob("*.html")):
        t0 = time.time()
        browser.open(page.as_uri())
        report = browser.evaluate(PAGE_REPORT)
        report["errors"], report["seconds"] = list(browser.errors), time.time() - t0
        found[page.name] = report
        if page.name == "index.html": browser.screenshot(shots / "index.png")
    chapter = max((p for p in found if p != "index.html"), key=lambda p: (found[p]["first_figure"] is not None,
                                                                         found[p]["rendered"]))
    browser.open((SITE / chapter).as_uri())
    browser.evaluate(PAGE_REPORT)
    browser.screenshot(shots / "chapter.png")
    if found[chapter]["first_figure"]:
        browser.screenshot(shots / "chapter-figure.png", clip=found[chapter]["first_figure"])
    print(f"\nscreenshots of index.html and {chapter} in {shots}")
    for name, r in found.items():
        print(f"{name:22s} {r['seconds']:5.1f} s  math {r['rendered']:4d}/{r['tex_sources']:<4d} images {r['images']:3d}  "
              f"links {len(r['links']):4d}")
    return found


def test_every_page_was_opened(reports):
    assert "index.html" in reports and len(reports) >= 2, sorted(reports)
    for name, r in reports.items():
        assert r["sidebar_links"] >= len(reports) - 1 or name == "index.html" or r["sidebar_links"] > 0, name


def test_math_is_typeset_offline(reports):
    assert sum(r["tex_sources"] for r in reports.values()) > 0, "no page has math: the math check checks nothing"
    for name, r in reports.items():
        assert r["mathjax"], f"{name}: MathJax did not load"
        assert r["rendered"] >= r["tex_sources"], f"{name}: {r['tex_sources']} formulas, {r['rendered']} typeset"
        assert not r["math_errors"], f"{name}: MathJax errors {r['math_errors'][:5]}"
        assert not r["raw_math"], f"{name}: raw TeX left in the text: {r['raw_math'][:5]}"


def test_every_image_loads(reports):
    assert sum(r["images"] for r in reports.values()) > 0, "no page has an image: the image check checks nothing"
    for name, r in reports.items():
        assert not r["broken_images"], f"{name}: images that did not load: {r['broken_images']}"


def test_no_console_errors(reports):
    for name, r in reports.items():
        assert not r["errors"], f"{name}: {r['errors'][:5]}"


def test_internal_links_resolve(reports):
    ids, bad, checked = {}, [], 0
    for name, r in reports.items():
        for href in r["links"]:
            url = urllib.parse.urlsplit(href)
            if url.scheme != "file": continue
            checked += 1
            target = Path(urllib.parse.unquote(url.path))
            if not target.exists():
                bad.append(f"{name} -> {href} (no such file)")
            elif url.fragment and target.suffix == ".html" and urllib.parse.unquote(url.fragment) not in page_ids(target, ids):
                bad.append(f"{name} -> {href} (no such anchor)")
    assert checked > 0, "no internal links found"
    assert not bad, "\n".join(bad[:20]) + (f"\n... {len(bad)} in all" if len(bad) > 20 else "")


def test_screenshots_saved(reports):
    for f in ("index.png", "chapter.png"):
        path = SITE / "screenshots" / f
        assert path.exists() and path.stat().st_size > 10_000, path
