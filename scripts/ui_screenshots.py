"""Check the MLflow and Prefect web UIs as a user sees them, and save screenshots.

    python scripts/ui_screenshots.py [--mlflow-uri URI] [--experiment NAME]
        [--prefect-home DIR | --prefect-api-url URL | --no-prefect] [--out docs/figures]

MLflow: starts `mlflow server` (--workers 1, job execution and telemetry off) on
127.0.0.1:<free port> against the tracking store (default sqlite:///<repo>/mlflow.db), opens
in headless Chromium, with a fresh profile (nothing seeded: what a new user sees)

- the README's three clicks from MLflow's home page: "Model training", the experiment
  "ubo results: Yahoo! R3" (written by `make report`; another data set's if Yahoo has none)
  under "Recent Experiments", and the chart view: the dcg_at_3 chart must draw one bar per
  method -> mlflow_results.png;
- the experiment's runs table, sorted by run name so that child runs are listed flat (the
  default sort nests them, collapsed, under their parent): at least min(5, n) child run names
  such as "coat/umf/seed0" must be shown -> mlflow_runs.png;
- the "Model metrics" tab of one child run of the latest parent: the chart of a stepped metric
  (loss/train_loss if logged) must be drawn, i.e. its legend "<run> (<metric>)" next to a
  Plotly line with at least two points -> mlflow_metric.png.

Prefect: starts `prefect server start --no-services` on <prefect-home>/prefect.db (default
<repo>/.prefect; --no-services so that it never touches runs another server is handling), or
uses a running server (--prefect-api-url, else $PREFECT_API_URL when --prefect-home is not
given). It picks the latest top-level flow run that has child flow runs and opens the UI's
Runs page filtered to that run's time window, oldest first: the parent's name and the child
names (up to 20) must be shown -> prefect_runs.png.

What must be shown (run names, the metric) comes from the servers' REST APIs; the checks
then read what the page renders (`innerText`, Plotly's SVG paths). Chromium (fresh profile,
offline flags) is driven over the DevTools protocol with the `websockets` package (a
dependency of Prefect), so that each check waits for its page and the screenshot is taken of
the very page that was checked. Every process this script starts is stopped at the end; it
exits 1 with a message naming the failed check.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flows.ui import mlflow_command

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = "ubo"
WINDOW = (1400, 900)
# Offline machines: without these Chromium keeps calling hosts it cannot reach.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)
# Stepped metrics to plot, in order of preference (flows/tracked_run.py logs per-epoch curves).
PREFERRED_CURVES = ("loss/train_loss", "val/val_loss")
MIN_MLFLOW_NAMES = 5  # child run names the runs table must show (fewer if there are fewer)
MAX_PREFECT_CHILDREN = 20  # child flow run names the Prefect runs page must show


class CheckFailed(RuntimeError):
    """A UI did not show what it should (or could not be started)."""


# -- background processes --------------------------------------------------------------------
class Processes:
    """Processes this script started, each in its own session; all stopped on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(
        self, name: str, command: Sequence[str], env: dict[str, str], cwd: Path
    ) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its children
            )
        self.started.append((name, process, log))
        return process

    def log_tail(self, process: subprocess.Popen, lines: int = 15) -> str:
        for _, candidate, log in self.started:
            if candidate is process:
                with contextlib.suppress(OSError):
                    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        for _, process, _ in reversed(self.started):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process, _ in reversed(self.started):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            # Children that outlived their leader (same process group).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        self.started.clear()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(
    url: str, process: subprocess.Popen, processes: Processes, what: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckFailed(
                f"{what} exited with code {process.returncode}:\n{processes.log_tail(process)}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise CheckFailed(f"{what} not healthy at {url} after {timeout:.0f} s")


def http_json(url: str, body: dict | None = None) -> Any:
    """GET (or POST `body` as JSON to) a local server; the decoded JSON answer."""
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise CheckFailed(f"{url}: HTTP {error.code} {detail}") from error
    except OSError as error:
        raise CheckFailed(f"{url}: {error}") from error


def _service_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.update(extra)
    return env


# -- headless Chromium over the DevTools protocol --------------------------------------------
class Browser:
    """Headless Chromium with a fresh profile, driven over the DevTools protocol."""

    def __init__(self, chromium: str, workdir: Path, window: tuple[int, int] = WINDOW) -> None:
        self.chromium = chromium
        self.workdir = Path(workdir)
        self.window = window
        self.process: subprocess.Popen | None = None
        self.connection: Any = None
        self.ids = itertools.count(1)

    def __enter__(self) -> Browser:
        from websockets.sync.client import connect  # a dependency of prefect

        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=self.workdir))
        log = self.workdir / "chromium.log"
        width, height = self.window
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [
                    self.chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--window-size={width},{height}",
                    "--remote-debugging-port=0",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            active = profile / "DevToolsActivePort"  # "<port>\n<browser target path>"
            deadline = time.monotonic() + 30
            while not (active.is_file() and len(active.read_text().split()) >= 2):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                    raise CheckFailed(f"Chromium did not start ({self.chromium}):\n{tail}")
                time.sleep(0.05)
            port, path = active.read_text().split()[:2]
            self.connection = connect(
                f"ws://127.0.0.1:{port}{path}", max_size=None, proxy=None, open_timeout=30
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.call("Browser.close", timeout=5)
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def call(
        self, method: str, session: str | None = None, timeout: float = 60, **params: Any
    ) -> dict:
        message_id = next(self.ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self.connection.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.connection.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") != message_id:
                continue  # an event, or the reply to nothing we wait for
            if "error" in reply:
                raise CheckFailed(f"DevTools {method} failed: {reply['error']}")
            return reply.get("result", {})

    def open(self, url: str, preload: str = "") -> Page:
        """A new tab of the window's size showing `url`; `preload` runs before its scripts."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session)  # needed for the preload script to be installed
        width, height = self.window
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        if preload:
            self.call("Page.addScriptToEvaluateOnNewDocument", session, source=preload)
        self.call("Page.navigate", session, url=url)
        return Page(self, session, target, url)


@dataclass
class Page:
    browser: Browser
    session: str
    target: str
    url: str

    def evaluate(self, expression: str) -> Any:
        result = self.browser.call(
            "Runtime.evaluate",
            self.session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            return None  # the page is not there yet (e.g. document.body is null)
        return result["result"].get("value")

    def wait_for(self, expression: str, done: Any, what: str, timeout: float = 60) -> Any:
        """Evaluate `expression` until `done(value)` is true; return that value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if done(value):
                return value
            time.sleep(0.25)
        raise CheckFailed(f"{what}: not shown after {timeout:.0f} s at {self.url} (saw {value!r})")

    def screenshot(self, path: Path, settle: float = 1.5) -> Path:
        time.sleep(settle)  # let charts and fonts finish drawing
        data = self.browser.call("Page.captureScreenshot", self.session, format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.browser.call("Target.closeTarget", targetId=self.target)


# JavaScript run in the pages. `NAMES_SHOWN(names)`: which of `names` the page shows as text.
NAMES_SHOWN = "(names => {{ const text = document.body ? document.body.innerText : ''; \
return names.filter(name => text.includes(name)); }})({names})"
# The drawn chart whose text includes `label`: a Plotly line with >= 2 points near the label.
CHART_SHOWN = """(label => {{
  if (!document.body) return null;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode()); ) {{
    if (!node.textContent.includes(label)) continue;
    let el = node.parentElement;
    for (let depth = 0; el && depth < 10; depth++, el = el.parentElement) {{
      if (!el.querySelector('.js-plotly-plot')) continue;
      const lines = [...el.querySelectorAll('.js-plotly-plot path.js-line')]
        .filter(path => (path.getAttribute('d') || '').includes('L'));
      if (!lines.length) break;
      el.scrollIntoView({{block: 'nearest'}});
      return {{label: label, lines: lines.length, svg: !!el.querySelector('svg.main-svg')}};
    }}
  }}
  return null;
}})({label})"""
# Scroll the page's scroller so that the element showing exactly `text` is `offset` px below
# the top (or as far as it goes); true if found.
REVEAL = """((text, offset) => {{
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode()); ) {{
    if (node.textContent.trim() !== text) continue;
    const el = node.parentElement;
    for (let box = el.parentElement; box; box = box.parentElement) {{
      if (/(auto|scroll)/.test(getComputedStyle(box).overflowY)
          && box.scrollHeight > box.clientHeight) {{
        const below = el.getBoundingClientRect().top - box.getBoundingClientRect().top;
        box.scrollTop += below - offset;  // clamped by the browser
        return true;
      }}
    }}
    el.scrollIntoView({{block: 'start'}});
    return true;
  }}
  return false;
}})({text}, {offset})"""


# -- MLflow ----------------------------------------------------------------------------------
@dataclass
class MlflowTarget:
    """What the MLflow pages must show, read from the store."""

    experiment_id: str
    child_names: list[str]  # unique names of the experiment's child runs, sorted
    run_id: str  # the child run whose chart is checked
    run_name: str
    metric: str  # a metric of that run with >= 2 steps


def absolute_store_uri(uri: str) -> str:
    """`sqlite:///relative.db` resolved against the working directory (the server runs
    elsewhere); other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix) :].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).is_absolute():
            return prefix + str(Path(path).resolve()) + uri[len(prefix) + len(path) :]
    return uri


def _curve_order(key: str) -> tuple:
    # The preferred curves first, then per-epoch names (`loss/...`, `val/...`), then the rest.
    rank = PREFERRED_CURVES.index(key) if key in PREFERRED_CURVES else len(PREFERRED_CURVES)
    return rank, "/" not in key, key


def _mlflow_runs(base_url: str, experiment_id: str, filter_string: str) -> list[dict]:
    runs: list[dict] = []
    token = None
    while True:
        body = {
            "experiment_ids": [experiment_id],
            "filter": filter_string,
            "run_view_type": "ACTIVE_ONLY",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 1000,
        }
        if token:
            body["page_token"] = token
        page = http_json(f"{base_url}/api/2.0/mlflow/runs/search", body)
        runs.extend(page.get("runs", []))
        token = page.get("next_page_token")
        if not token:
            return runs


def mlflow_target(base_url: str, experiment: str = DEFAULT_EXPERIMENT) -> MlflowTarget:
    """The experiment's child runs, and one child (of the latest parent) with a curve, as
    the MLflow server at `base_url` reports them (REST API)."""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        found = http_json(f"{base_url}/api/2.0/mlflow/experiments/get-by-name?{query}")
    except CheckFailed as error:
        raise CheckFailed(f"no experiment {experiment!r} in the store ({error})") from error
    experiment_id = found["experiment"]["experiment_id"]
    runs = []
    for run in _mlflow_runs(base_url, experiment_id, "tags.`mlflow.parentRunId` != ''"):
        tags = {tag["key"]: tag["value"] for tag in run.get("data", {}).get("tags", [])}
        metrics = {metric["key"] for metric in run.get("data", {}).get("metrics", [])}
        if run["info"].get("run_name") and tags.get("mlflow.parentRunId"):
            runs.append((run["info"], tags["mlflow.parentRunId"], metrics))
    if not runs:
        raise CheckFailed(f"experiment {experiment!r} has no child runs")
    latest_parent = runs[0][1]  # newest first
    family = sorted((r for r in runs if r[1] == latest_parent), key=lambda r: r[0]["run_name"])
    for info, _, metrics in family:
        for key in sorted(metrics, key=_curve_order):
            query = urllib.parse.urlencode({"run_id": info["run_id"], "metric_key": key})
            history = http_json(f"{base_url}/api/2.0/mlflow/metrics/get-history?{query}")
            if len(history.get("metrics", [])) >= 2:
                return MlflowTarget(
                    experiment_id=experiment_id,
                    child_names=sorted({r[0]["run_name"] for r in runs}),
                    run_id=info["run_id"],
                    run_name=info["run_name"],
                    metric=key,
                )
    raise CheckFailed(f"no child run of parent {latest_parent} has a metric with two or more steps")


def check_store(tracking_uri: str) -> str:
    """The store URI made absolute; a sqlite store must exist (the server would create an
    empty one)."""
    tracking_uri = absolute_store_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
        if not database.is_file():
            raise CheckFailed(f"no MLflow store at {database}; run a study first")
    return tracking_uri


def start_mlflow(processes: Processes, tracking_uri: str, workdir: Path) -> str:
    """`mlflow server` on 127.0.0.1:<free port> against the store; returns its base URL."""
    port = free_port()
    process = processes.start(
        "mlflow-server",
        mlflow_command(absolute_store_uri(tracking_uri), port),  # what `make ui` starts
        # No job runner (7 extra processes, unused by the UI pages checked here).
        env=_service_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        cwd=workdir,  # its default ./mlartifacts lands in the throwaway directory
    )
    base = f"http://127.0.0.1:{port}"
    wait_healthy(f"{base}/health", process, processes, "mlflow server")
    return base


@dataclass
class MlflowResult:
    runs_png: Path
    metric_png: Path
    names_shown: list[str]
    chart: dict
    runs_url: str
    metric_url: str


def check_mlflow(
    browser: Browser, base_url: str, target: MlflowTarget, out_dir: Path, timeout: float = 60
) -> MlflowResult:
    """Runs table lists the child runs; the child run's page draws the metric's curve."""
    query = "workflowType=machine_learning"  # the "Model training" view of the experiment
    # Sorting by anything but the creation date lists child runs flat (not under a parent).
    sort = "orderByKey=" + urllib.parse.quote("tags.`mlflow.runName`") + "&orderByAsc=true"
    runs_url = f"{base_url}/#/experiments/{target.experiment_id}/runs?{query}&{sort}"
    need = min(MIN_MLFLOW_NAMES, len(target.child_names))
    page = browser.open(runs_url)
    try:
        shown = page.wait_for(
            NAMES_SHOWN.format(names=json.dumps(target.child_names)),
            lambda names: names is not None and len(names) >= need,
            f"MLflow runs table listing {need} of the child runs {target.child_names[:need]}",
            timeout,
        )
        runs_png = page.screenshot(Path(out_dir) / "mlflow_runs.png")
    finally:
        page.close()

    metric_url = (
        f"{base_url}/#/experiments/{target.experiment_id}/runs/{target.run_id}/model-metrics"
        f"?{query}"
    )
    label = f"{target.run_name} ({target.metric})"
    page = browser.open(metric_url)
    try:
        chart = page.wait_for(
            CHART_SHOWN.format(label=json.dumps(label)),
            bool,
            f"MLflow chart of {target.metric} (legend {label!r} with a drawn line)",
            timeout,
        )
        metric_png = page.screenshot(Path(out_dir) / "mlflow_metric.png")
    finally:
        page.close()
    return MlflowResult(runs_png, metric_png, shown, chart, runs_url, metric_url)


# The three clicks of the README from MLflow's home page in a fresh browser profile.
CLICK_TEXT = """(text => {{
  const candidates = [...document.querySelectorAll('a'),
                      ...document.querySelectorAll('button, label, span')];
  const el = candidates.find(e => e.innerText && e.innerText.trim() === text);
  if (!el) return false;
  el.click();
  return true;
}})({text})"""
CLICK_CHART_VIEW = """(() => {
  const input = document.querySelector('input[name="runs-view-mode"][value="CHART"]');
  if (!input) return false;
  (input.closest('label') || input).click();
  return true;
})()"""
# The bar chart titled `metric`: how many bars it draws, and the run names its card shows.
BARS_SHOWN = """(metric => {{
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {{
    let card = plot;
    for (let depth = 0; card && depth < 8; depth++, card = card.parentElement) {{
      if ((card.innerText || '').split('\\n').some(line => line.trim() === metric)) break;
    }}
    if (!card) continue;
    const bars = plot.querySelectorAll('g.trace.bars g.point path, g.barlayer g.point path');
    if (!bars.length) continue;
    return {{metric: metric, bars: bars.length}};
  }}
  return null;
}})({metric})"""


def results_target(base_url: str, preferred: str = "Yahoo! R3") -> tuple[str, int] | None:
    """A results experiment written by `make report` (the `preferred` data set's if there
    is one) and its number of methods, or None."""
    found = http_json(
        f"{base_url}/api/2.0/mlflow/experiments/search",
        {"max_results": 1000, "filter": "name LIKE 'ubo results: %'"},
    ).get("experiments", [])
    if not found:
        return None
    names = {e["name"]: e["experiment_id"] for e in found}
    name = f"ubo results: {preferred}" if f"ubo results: {preferred}" in names else min(names)
    return name, len(_mlflow_runs(base_url, names[name], ""))


@dataclass
class ResultsResult:
    png: Path
    clicks: list[str]
    bars: int
    url: str


def check_results(
    browser: Browser,
    base_url: str,
    experiment: str,
    n_methods: int,
    out_dir: Path,
    metric: str = "dcg_at_3",
    timeout: float = 60,
) -> ResultsResult:
    """README's path in a fresh profile: MLflow's home page, then "Model training", the
    results experiment under "Recent Experiments", and the chart view; the `metric` chart
    must draw one bar per method."""
    page = browser.open(f"{base_url}/")
    clicks = []
    try:
        for label, action in [
            ("Model training", CLICK_TEXT.format(text=json.dumps("Model training"))),
            (experiment, CLICK_TEXT.format(text=json.dumps(experiment))),
            ("chart view", CLICK_CHART_VIEW),
        ]:
            page.wait_for(action, bool, f"MLflow: clicking {label!r}", timeout)
            clicks.append(label)
            time.sleep(1.0)  # the next page's elements replace this one's
        shown = page.wait_for(
            BARS_SHOWN.format(metric=json.dumps(metric)),
            lambda value: bool(value) and value["bars"] >= n_methods,
            f"MLflow chart view of {experiment!r} drawing {n_methods} bars of {metric}",
            timeout,
        )
        url = page.evaluate("location.href")
        png = page.screenshot(Path(out_dir) / "mlflow_results.png")
    finally:
        page.close()
    return ResultsResult(png, clicks, shown["bars"], url)


# -- Prefect ---------------------------------------------------------------------------------
def start_prefect(processes: Processes, home: Path, workdir: Path) -> str:
    """`prefect server start --no-services` on <home>/prefect.db; returns its API URL."""
    database = Path(home).resolve() / "prefect.db"
    if not database.is_file():
        raise CheckFailed(f"no Prefect database at {database}; run a study first")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _service_env(
        PREFECT_HOME=str(Path(home).resolve()),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{database}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=api_url,  # else the UI asks the default port 4200
        PREFECT_UI_STATIC_DIRECTORY=str(Path(workdir) / "prefect-ui"),  # not site-packages
    )
    env.pop("PREFECT_API_URL", None)
    process = processes.start(
        "prefect-server",
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-services",
        ],
        env=env,
        cwd=workdir,
    )
    wait_healthy(f"{api_url}/health", process, processes, "prefect server")
    return api_url


@dataclass
class PrefectTarget:
    parent_name: str
    parent_id: str
    child_names: list[str]  # oldest first, as the page lists them
    start: datetime  # window of the family's expected start times, with a margin
    end: datetime


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def prefect_target(api_url: str) -> PrefectTarget:
    """The latest top-level flow run that has child flow runs, and those children."""
    parents = http_json(
        f"{api_url}/flow_runs/filter",
        {
            "flow_runs": {"parent_task_run_id": {"is_null_": True}},
            "sort": "START_TIME_DESC",
            "limit": 25,
        },
    )
    for parent in parents:
        children = http_json(
            f"{api_url}/flow_runs/filter",
            {
                "flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [parent["id"]]}},
                "sort": "START_TIME_ASC",
                "limit": 200,
            },
        )
        if not children:
            continue
        times = [
            t
            for run in [parent, *children]
            for t in (_time(run.get("expected_start_time")), _time(run.get("start_time")))
            if t is not None
        ]
        return PrefectTarget(
            parent_name=parent["name"],
            parent_id=parent["id"],
            child_names=[child["name"] for child in children],
            start=min(times) - timedelta(minutes=1),
            end=max(times) + timedelta(minutes=1),
        )
    raise CheckFailed(f"no flow run with child flow runs among the latest 25 at {api_url}")


@dataclass
class PrefectResult:
    runs_png: Path
    names_shown: list[str]
    url: str


def check_prefect(
    browser: Browser, ui_url: str, target: PrefectTarget, out_dir: Path, timeout: float = 60
) -> PrefectResult:
    """The Runs page, limited to the family's time window and sorted oldest first, lists the
    parent flow run and its children."""

    def stamp(moment: datetime) -> str:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    query = urllib.parse.urlencode(
        {
            "type": "range",
            "startDate": stamp(target.start),
            "endDate": stamp(target.end),
            "flow-runs-sort": "START_TIME_ASC",
        }
    )
    url = f"{ui_url.rstrip('/')}/runs?{query}"
    children = target.child_names[:MAX_PREFECT_CHILDREN]
    expected = [target.parent_name, *dict.fromkeys(children)]
    page = browser.open(url)
    try:
        shown = page.wait_for(
            NAMES_SHOWN.format(names=json.dumps(expected)),
            lambda names: names is not None and len(names) == len(expected),
            f"Prefect runs page listing flow run {target.parent_name!r} and its children "
            f"{list(dict.fromkeys(children))}",
            timeout,
        )
        # Scroll the list (below the filters and the scatter plot) into view, parent on top.
        page.evaluate(REVEAL.format(text=json.dumps(target.parent_name), offset=110))
        runs_png = page.screenshot(Path(out_dir) / "prefect_runs.png")
    finally:
        page.close()
    return PrefectResult(runs_png, shown, url)


# -- command line ----------------------------------------------------------------------------
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run(
    mlflow_uri: str,
    out_dir: Path,
    experiment: str = DEFAULT_EXPERIMENT,
    prefect_home: Path | None = None,
    prefect_api_url: str | None = None,
    with_prefect: bool = True,
    chromium: str | None = None,
) -> list[Path]:
    """All checks; returns the screenshots. Raises CheckFailed."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise CheckFailed("no chromium on PATH (Debian: apt-get install chromium)")
    out_dir = Path(out_dir)
    saved: list[Path] = []
    store = check_store(mlflow_uri)
    with (
        tempfile.TemporaryDirectory(prefix="ui-screenshots-") as tmp,
        Processes(Path(tmp)) as processes,
    ):
        workdir = Path(tmp)
        mlflow_url = start_mlflow(processes, store, workdir)
        print(f"mlflow server at {mlflow_url} on {store}", flush=True)
        target = mlflow_target(mlflow_url, experiment)
        prefect_api = None
        if with_prefect:
            if prefect_home is None and prefect_api_url:
                prefect_api = prefect_api_url.rstrip("/")
            else:
                prefect_api = start_prefect(processes, prefect_home or REPO / ".prefect", workdir)
                print(f"prefect server at {prefect_api} on {prefect_home or REPO / '.prefect'}")
        results_experiment = results_target(mlflow_url)
        with Browser(chromium, workdir) as browser:
            if results_experiment is not None:
                name, n_methods = results_experiment
                results = check_results(browser, mlflow_url, name, n_methods, out_dir)
                print(
                    f"ok  MLflow home -> {' -> '.join(results.clicks)}: {results.bars} bars of "
                    f"dcg_at_3 side by side: {results.png}"
                )
                saved.append(results.png)
            else:
                print("(no 'ubo results: ...' experiment yet: run `make report` first)")
            result = check_mlflow(browser, mlflow_url, target, out_dir)
            print(
                f"ok  MLflow runs table shows {len(result.names_shown)} child run names "
                f"({', '.join(result.names_shown[:5])}...): {result.runs_png}\n"
                f"ok  MLflow run {target.run_name} draws {target.metric} "
                f"({result.chart['lines']} line(s)): {result.metric_png}"
            )
            saved += [result.runs_png, result.metric_png]
            if prefect_api is not None:
                family = prefect_target(prefect_api)
                ui_url = prefect_api.removesuffix("/api")
                shown = check_prefect(browser, ui_url, family, out_dir)
                print(
                    f"ok  Prefect runs page shows flow run {family.parent_name} and "
                    f"{len(shown.names_shown) - 1} child name(s): {shown.runs_png}"
                )
                saved.append(shown.runs_png)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/ui_screenshots.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--mlflow-uri",
        default=f"sqlite:///{REPO / 'mlflow.db'}",
        help="backend store of the study (default: sqlite:///<repo>/mlflow.db)",
    )
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    prefect = parser.add_mutually_exclusive_group()
    prefect.add_argument(
        "--prefect-home",
        type=Path,
        help="start a Prefect server on DIR/prefect.db (default: <repo>/.prefect, unless "
        "$PREFECT_API_URL names a running server)",
    )
    prefect.add_argument(
        "--prefect-api-url", help="a running Prefect server (default: $PREFECT_API_URL)"
    )
    prefect.add_argument("--no-prefect", action="store_true", help="check MLflow only")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    api_url = args.prefect_api_url or (
        None if args.prefect_home else os.environ.get("PREFECT_API_URL")
    )
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill
    started = time.monotonic()
    try:
        saved = run(
            args.mlflow_uri,
            args.out,
            experiment=args.experiment,
            prefect_home=args.prefect_home,
            prefect_api_url=api_url,
            with_prefect=not args.no_prefect,
            chromium=args.chromium,
        )
    except CheckFailed as error:
        print(f"UI check failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{len(saved)} screenshots in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
