"""Real-browser fixtures: Debian's chromium driven by Playwright, JupyterLab and Voila on 127.0.0.1.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` (``apt-get
install chromium``; ``VITLENS_CHROMIUM`` points elsewhere). These tests skip only
when that browser is missing *and* the ``CI`` variable is unset; in CI they
always run. Pages are hermetic: every
request that is not to 127.0.0.1, ``data:`` or ``blob:`` is aborted (and fails
the test, except Voila's two fontawesome stylesheets from a CDN).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).parent

CHROMIUM = Path(os.environ.get("VITLENS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Voila asks a CDN for fontawesome; offline that fails with exactly these (icons are never relied on).
KNOWN_OFFLINE = "fontawesome-free"


def playwright_expect():
    """Playwright's ``expect``; where playwright is missing, skips the calling test module, except
    in CI or where chromium is installed (there a missing playwright is an error, never a skip)."""
    try:
        from playwright.sync_api import expect
    except ImportError:
        if os.environ.get("CI") or CHROMIUM.exists():
            raise
        pytest.skip(f"{CHROMIUM} is missing (and so is playwright)", allow_module_level=True)
    return expect


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a real browser against a Jupyter server (chromium)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CHROMIUM.exists() or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} is missing (apt-get install chromium); in CI these tests always run")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


# -- servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A Jupyter server we started (its own process group), and where to reach it."""

    name: str
    process: subprocess.Popen
    url: str
    folder: Path
    log: Path
    base: str = ""  # http://127.0.0.1:PORT
    token: str = ""
    notebook: str = ""

    def api(self, path: str):
        """GET a Jupyter REST endpoint (JSON)."""
        with urllib.request.urlopen(f"{self.base}/api/{path}?token={self.token}", timeout=5) as r:  # noqa: S310
            return json.load(r)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """Stop the server and the kernels it started (each kernel runs in a session of its own)."""
        kernels = children(self.process.pid)
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        for pid in kernels:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it stopped with its server
                pass


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def server_env(folder: Path) -> dict[str, str]:
    """Isolated Jupyter config/runtime dirs; the kernel is this interpreter's (on PATH first)."""
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"),
                     ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"), ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces")):
        path = folder / ".jupyter" / sub
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def wait_until(ready, what: str, server: Server, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited while {what}:\n{server.tail()}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f} s ({what}):\n{server.tail()}")


def start(name: str, args: list[str], folder: Path, url: str) -> Server:
    log = folder / f"{name}.log"
    process = subprocess.Popen(args, cwd=folder, env=server_env(folder), stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, process, url, folder, log)


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - 127.0.0.1 only
        return r.status == 200


def served_folder(tmp_path_factory, name: str, writer=None, **options) -> Path:
    """A fresh folder holding a test notebook (its captures are written beside it).

    ``writer(folder, **options)`` writes the notebook (default: the widgets notebook,
    ``explorer.ipynb``).
    """
    from .notebook_template import write_notebook

    folder = tmp_path_factory.mktemp(name)
    (writer or write_notebook)(folder, **options)
    return folder


@contextlib.contextmanager
def voila_server(folder: Path, notebook: str = "explorer.ipynb") -> Iterator[Server]:
    """Voila serving ``folder/notebook`` on a free port of 127.0.0.1, stopped afterwards."""
    port = free_port()
    server = start("voila", [sys.executable, "-m", "voila", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
                             notebook], folder, f"http://127.0.0.1:{port}/")
    try:
        # a TCP answer is enough: GET / would start a kernel and run the notebook
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None,
                   "opening its port", server)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def lab_server(folder: Path, notebook: str = "explorer.ipynb") -> Iterator[Server]:
    """JupyterLab on a free port of 127.0.0.1 with ``folder`` as its root, opening ``notebook``."""
    port = free_port()
    token = secrets.token_hex(16)
    # Render every cell (no notebook windowing), so that outputs scrolled away stay drawn,
    # and start the notebook's kernel without asking which one.
    settings = folder / ".jupyter" / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none", "autoStartDefaultKernel": true}')
    server = start("jupyterlab", [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1",
                                  f"--port={port}", f"--IdentityProvider.token={token}",
                                  f"--ServerApp.root_dir={folder}"],
                   folder, f"http://127.0.0.1:{port}/lab/tree/{notebook}?token={token}&reset")
    server.base, server.token, server.notebook = f"http://127.0.0.1:{port}", token, notebook
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/api/status?token={token}"), "answering /api/status", server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def voila(tmp_path_factory) -> Iterator[Server]:
    # Voila's page gets plotly's bundle from the kernel (its first figure, the carrier, is closed);
    # JupyterLab's from the first figure, as usual.
    with voila_server(served_folder(tmp_path_factory, "voila", carrier=False)) as server:
        yield server


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Server]:
    with lab_server(served_folder(tmp_path_factory, "lab")) as server:
        yield server


# -- opening a notebook in JupyterLab ---------------------------------------------------------
KERNEL_DIALOG = ".jp-Dialog"
IDLE = "!!document.querySelector(\".jp-Notebook-ExecutionIndicator[data-status='idle']\")"
TIMEOUT_MS = 30_000


def answer_kernel_dialog(page) -> bool:
    """Accept JupyterLab's "Select Kernel" dialog (python3) if it is open; whether it was."""
    if not page.locator(KERNEL_DIALOG).count():
        return False
    page.locator(f"{KERNEL_DIALOG} .jp-mod-accept").click()
    page.wait_for_function(f"() => !document.querySelector('{KERNEL_DIALOG}') && {IDLE}", timeout=TIMEOUT_MS * 3)
    return True


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator("[data-command='runmenu:run-all']").click()


def kernel_connected(lab: Server) -> bool:
    """The server's word that the notebook's kernel is up, idle, and the page connected to it."""
    return any(s["path"].endswith(lab.notebook) and s["kernel"]["execution_state"] == "idle"
               and s["kernel"]["connections"] > 0 for s in lab.api("sessions"))


def open_and_run_in_lab(page, lab: Server, plots: int) -> None:
    """Open the server's notebook, wait for its kernel, run all cells, wait for ``plots`` plotly figures."""
    drawn = f"document.querySelectorAll('.js-plotly-plot').length >= {plots}"
    page.goto(lab.url, timeout=TIMEOUT_MS * 2)
    page.wait_for_function(f"() => {IDLE} || !!document.querySelector('{KERNEL_DIALOG}')", timeout=TIMEOUT_MS * 3)
    answer_kernel_dialog(page)
    deadline = time.monotonic() + TIMEOUT_MS / 1000 * 3
    while not kernel_connected(lab):  # the page shows "idle" before it has a kernel
        assert time.monotonic() < deadline, f"no kernel connected: {lab.api('sessions')}"
        answer_kernel_dialog(page)
        page.wait_for_timeout(250)
    run_all(page)
    page.wait_for_function(f"() => {drawn} || !!document.querySelector('{KERNEL_DIALOG}')", timeout=TIMEOUT_MS * 4)
    if answer_kernel_dialog(page):  # it can also open once the run has started: run again
        run_all(page)
        page.wait_for_function(f"() => {drawn}", timeout=TIMEOUT_MS * 4)


def open_in_voila(page, voila: Server, plots: int) -> None:
    """Open Voila's page (it runs the notebook) and wait for ``plots`` plotly figures."""
    page.goto(voila.url, timeout=TIMEOUT_MS * 4)
    page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length >= {plots}",
                           timeout=TIMEOUT_MS * 4)


# -- the browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (CI must run the browser tests)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class PageProblems:
    """Page errors, console errors, dialogs (alert, confirm, ...) and requests that left 127.0.0.1."""

    errors: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert not self.dialogs, f"the page opened dialogs (script ran): {self.dialogs}"
        assert not self.errors, "the page reported errors:\n" + "\n".join(self.errors)


def _hermetic(route) -> None:
    url = route.request.url
    if url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
        route.continue_()
    else:
        route.abort()


@pytest.fixture
def page_factory(browser):
    contexts = []

    def make(allow_offline: str | None = None, viewport: dict | None = None):
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 1000}, device_scale_factor=1)
        context.route("**/*", _hermetic)
        contexts.append(context)
        page = context.new_page()
        problems = PageProblems()

        def on_console(msg) -> None:
            if msg.type != "error":
                return
            where = (msg.location or {}).get("url", "")
            if allow_offline and allow_offline in where:
                problems.offline.append(where)
                return
            problems.errors.append(f"console error: {msg.text} ({where})")

        def on_request_failed(request) -> None:
            url = request.url
            if allow_offline and allow_offline in url:
                return
            if not url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
                problems.errors.append(f"request left 127.0.0.1: {url}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: problems.errors.append(f"page error: {exc}"))
        page.on("requestfailed", on_request_failed)

        def on_dialog(dialog) -> None:  # no vitlens page opens one: a dialog is script from data
            problems.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        return page, problems

    yield make
    for context in contexts:
        context.close()


#: One line per browser run: slider move → plotly redraw latency (printed in the summary).
LATENCY_LINES: list[str] = []


@pytest.fixture(scope="session")
def latency_lines() -> list[str]:
    return LATENCY_LINES


def pytest_terminal_summary(terminalreporter) -> None:
    if LATENCY_LINES:
        terminalreporter.section("vitlens widgets: end-to-end latency in the browser")
        for line in LATENCY_LINES:
            terminalreporter.write_line(line)
