"""Notebooks 03 and 06 run in a real JupyterLab, driven through its UI by headless Chromium.

What papermill cannot see: the page a person gets. JupyterLab (requirements-lab.txt) serves prepared
copies of the notebooks whose parameters select the smoke profile and a run that stages 01-05 set up
first; Chromium (Debian's `chromium` and `chromium-driver`) opens each one, runs all cells from the
Run menu and saves it. We check no cell raised, 03's plots are images, and 06's chat box is a live
widget that answers a typed message. Screenshots of every step go to the test's temporary folder
(`.../screenshots/`), the failing step's as `FAILED-<step>.png`.

Selenium drives Chromium (not playwright-core through node): it is one pinned pip package in the
project's own requirement files and talks to Debian's chromedriver, so no node toolchain and no
browser download. Every wait waits on something observable (an HTTP answer, a DOM element, the
kernel's status indicator, the saved file), never on a bare sleep.

Without JupyterLab, selenium or Chromium the test is skipped and says what to install; `.ci/run`
sets QLORA_REQUIRE_BROWSER=1, which makes that a failure instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from qlora_helpers.paths import PROJECT_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = ("`make lab` (JupyterLab and selenium into .venv, from requirements-lab.txt) and "
           "`apt-get install -y chromium chromium-driver`")
RUN_ALL_TIMEOUT = 1200  # seconds; 06 merges, benchmarks and serves: minutes on a loaded 2-core machine
ANSWER_TIMEOUT = 300
RUN = "browser"


def _missing() -> list[str]:
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not found]
    for module in ("jupyterlab", "selenium"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


@pytest.fixture(scope="module", autouse=True)
def browser_tools():
    missing = _missing()
    if missing:
        message = f"the browser test needs {', '.join(missing)}: install them with {INSTALL}"
        if os.environ.get("QLORA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"QLORA_REQUIRE_BROWSER=1 but {message}")
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare_notebooks(root: Path, outputs: Path) -> None:
    """Copies of 03 and 06 with papermill's parameter injection (smoke profile, the prepared run),
    in a folder that looks like a clone to their setup cell (a `qlora_helpers` link at its root)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    (root / "qlora_helpers").symlink_to(PROJECT_ROOT / "qlora_helpers", target_is_directory=True)
    (root / "notebooks").mkdir()
    parameters = {"config": str(PROJECT_ROOT / "configs" / "smoke.yaml"), "run_name": RUN,
                  "overrides": [], "outputs_dir": str(outputs)}
    for name in ("03_data_prep.ipynb", "06_serve.ipynb"):
        nb = load_notebook_node(str(PROJECT_ROOT / "notebooks" / name))  # as papermill reads it
        nbformat.write(parameterize_notebook(nb, parameters), root / "notebooks" / name)


def _lab_settings(settings: Path) -> None:
    """Every cell in the DOM (no virtual scrolling) and no news or update checks (offline)."""
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                           "checkForUpdates": False}}.items():
        package, name = plugin.rsplit("/", 1)
        path = settings / package / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {proc.returncode} before serving; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        proc_wait = min(0.5, max(deadline - time.monotonic(), 0))
        with contextlib.suppress(subprocess.TimeoutExpired):  # wait on the process (early if it dies), no bare sleep
            proc.wait(timeout=proc_wait)
    raise AssertionError(f"JupyterLab did not answer {url} within {timeout:.0f} s; see {log}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Stages 01-05 on the smoke profile, then JupyterLab serving the prepared copies on 127.0.0.1."""
    from qlora_helpers.runner import run_pipeline

    base = tmp_path_factory.mktemp("browser")
    outputs, root = base / "outputs", base / "served"
    root.mkdir()
    run_pipeline("smoke", RUN, stages="01,02,03,04,05", outputs_dir=str(outputs), progress=False)
    _prepare_notebooks(root, outputs)
    settings = base / "lab-settings"
    _lab_settings(settings)
    port, token = _free_port(), secrets.token_hex(16)
    log = base / "jupyterlab.log"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.getuid() == 0:
        cmd.append("--allow-root")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        _wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log, timeout=180)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "root": root, "base": base}
    finally:
        proc.terminate()  # SIGTERM: the server shuts its kernels down, 06's server with them
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(lab, request):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = lab["base"] / f"chromium-{request.node.name}"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(180)
    shots = lab["base"] / "screenshots"
    shots.mkdir(exist_ok=True)
    driver.shots = shots
    yield driver
    driver.quit()


@contextmanager
def step(driver, name: str):
    """Screenshot after the step, or as FAILED-<name>.png when it raises."""
    try:
        yield
    except BaseException:
        driver.save_screenshot(str(driver.shots / f"FAILED-{name}.png"))
        raise
    driver.save_screenshot(str(driver.shots / f"{name}.png"))


# --- driving JupyterLab ---------------------------------------------------------------------------

# The kernel's state as the status bar and the notebook's execution indicator show it ("idle" when both do).
KERNEL_IDLE = """
const bar = document.querySelector('#jp-main-statusbar')?.innerText || '';
const indicator = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
return bar.includes('(ipykernel) | Idle') && indicator?.getAttribute('data-status') === 'idle' ? 'idle' : 'not idle';
"""
PROMPTS = """
const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];
return cells.map(c => c.textContent.trim());
"""


def _open(driver, lab, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{lab['url']}/lab/tree/notebooks/{name}?token={lab['token']}&reset")
    cell = (By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")
    WebDriverWait(driver, 300).until(EC.presence_of_element_located(cell))
    WebDriverWait(driver, 300).until(lambda d: d.execute_script(KERNEL_IDLE) == "idle",
                                     "the kernel never became idle after opening the notebook")


def _menu(driver, menu: str, label: str) -> None:
    """Click a menu bar entry, then one of its items by label (as a person would)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    title = WebDriverWait(driver, 60).until(EC.element_to_be_clickable(
        (By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel') and text()='{menu}']")))
    title.click()
    item = WebDriverWait(driver, 60).until(EC.element_to_be_clickable(
        (By.XPATH, f"//li[contains(@class,'lm-Menu-item')][.//div[contains(@class,'lm-Menu-itemLabel') "
                   f"and normalize-space()='{label}']]")))
    item.click()


def _run_all_and_save(driver, lab, name: str) -> dict:
    """Run All from the Run menu; done when every code cell shows an execution count and the kernel
    is idle. Then File > Save, and return the notebook as saved (what the UI received)."""
    from selenium.webdriver.support.ui import WebDriverWait

    path = lab["root"] / "notebooks" / name
    _menu(driver, "Run", "Run All Cells")

    idle_polls = [0]

    def finished(d):
        # done: every code cell ran and the kernel is idle; or Run All stopped at a cell that raised
        # (the queued cells are cleared, the kernel stays idle): three idle polls in a row, and the
        # error is reported from the saved notebook below instead of after RUN_ALL_TIMEOUT
        prompts = d.execute_script(PROMPTS)
        idle = d.execute_script(KERNEL_IDLE) == "idle"
        started = any(p.strip() not in ("", "[ ]:") for p in prompts or [])  # a cell ran or is running
        idle_polls[0] = idle_polls[0] + 1 if idle and started else 0
        ran = prompts and all(p.startswith("[") and p[1:-2].strip().isdigit() for p in prompts)
        return (ran and idle) or idle_polls[0] >= 3

    WebDriverWait(driver, RUN_ALL_TIMEOUT, poll_frequency=2).until(
        finished, f"Run All of {name} did not finish within {RUN_ALL_TIMEOUT} s (prompts: see the screenshot)")
    before = path.stat().st_mtime_ns
    _menu(driver, "File", "Save Notebook")
    WebDriverWait(driver, 120).until(lambda d: path.stat().st_mtime_ns != before and not d.execute_script(
        "return document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty') !== null"),
        f"{name} was not saved")
    return json.loads(path.read_text())


def _errors(nb: dict) -> list[str]:
    return [f"cell {i}: {o['ename']}: {o['evalue']}" for i, cell in enumerate(nb["cells"])
            for o in cell.get("outputs", []) if o["output_type"] == "error"]


def _open_run_all_and_save(driver, lab, name: str) -> dict:
    """Open, Run All, save; no cell may have raised. Screenshots `<nn>-opened`, `<nn>-ran`."""
    with step(driver, f"{name[:2]}-opened"):
        _open(driver, lab, name)
    with step(driver, f"{name[:2]}-ran"):
        nb = _run_all_and_save(driver, lab, name)
        assert not _errors(nb), f"{name} raised in the browser: {_errors(nb)}"
    return nb


def test_03_runs_all_cells_and_draws_its_plots_as_images(browser, lab):
    from selenium.webdriver.common.by import By

    nb = _open_run_all_and_save(browser, lab, "03_data_prep.ipynb")
    with step(browser, "03-images"):
        # the lengths histogram and the padding-efficiency plot: rendered <img> of PNG data, in the page
        images = browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedImage img")
        loaded = [img for img in images if browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 100", img)]
        assert len(loaded) >= 2, f"{len(images)} images in 03's outputs, {len(loaded)} loaded; expected the 2 plots"
        browser.execute_script("arguments[0].scrollIntoView()", loaded[0])  # the screenshot shows a plot
        saved_png = [o for cell in nb["cells"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(saved_png) >= 2


def test_06_chat_box_is_a_widget_that_answers(browser, lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    nb = _open_run_all_and_save(browser, lab, "06_serve.ipynb")
    with step(browser, "06-chat-saved"):
        chat = [o for cell in nb["cells"] if "chat_box(" in "".join(cell["source"])
                for o in cell.get("outputs", [])]
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in chat), chat
    panel = ".jp-NotebookPanel:not(.lm-mod-hidden)"
    with step(browser, "06-chat-box"):
        # rendered by the widget manager (a live comm), not the "Loading widget..." placeholder
        box = WebDriverWait(browser, 120).until(lambda d: d.find_elements(
            By.CSS_SELECTOR, f"{panel} .widget-vbox .widget-text input[type='text']"),
            "06's chat box did not render as a widget")[0]
        send = "//button[contains(@class,'jupyter-button') and normalize-space()='Send']"
        assert browser.find_elements(By.XPATH, send)
        box.click()
        box.send_keys("What is QLoRA?", Keys.ENTER)
    with step(browser, "06-answered"):
        chat_box = box.find_element(By.XPATH, "./ancestor::div[contains(@class,'widget-vbox')][1]")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", chat_box)

        def answer(d):  # the log above the entry holds the question and a non-empty, finished answer
            text = chat_box.find_element(By.CSS_SELECTOR, ".widget-html-content").text
            status = d.execute_script("return document.querySelector('#jp-main-statusbar').innerText")
            idle = "(ipykernel) | Idle" in status
            if "you: What is QLoRA?" in text and "model:" in text and idle:
                return text.split("model:", 1)[1].strip() or None
            return None

        reply = WebDriverWait(browser, ANSWER_TIMEOUT, poll_frequency=1).until(
            answer, "the chat box showed no answer to the typed message")
        assert reply
