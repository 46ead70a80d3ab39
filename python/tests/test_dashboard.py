"""The dashboard in a real browser: headless Chromium from Debian's
`chromium` package, driven through `chromium-driver`, against the demo
alliance of conftest.py. A person's steps: log in with a token, watch a job
until the jobs page shows it done, pause a GPU and see its state change on
its node and across the alliance. Any error in the browser's console fails
the test that caused it.

With ALLIANCE_SCREENSHOTS=DIR the pages are saved there as PNGs (the
README's pictures come from `ALLIANCE_SCREENSHOTS=docs/dashboard`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from test_client import SLOW, double_job

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


class Browser:
    """One headless Chromium window, and what a person does in it."""

    def __init__(self, shots: Path):
        options = webdriver.ChromeOptions()
        # The Debian package's browser and driver: nothing is downloaded.
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000", "--lang=en-GB"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        self.shots = shots

    def open(self, node, token: str) -> None:
        """Opens `node`'s dashboard and logs in with `token`."""
        self.driver.get(node.url + "/")
        field = self.wait(lambda d: self.visible("token"), "the login form")
        field.send_keys(token)
        self.driver.find_element(By.ID, "login-button").click()
        self.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-user"), "the login")

    def logout(self) -> None:
        self.driver.find_element(By.ID, "logout").click()
        self.wait(lambda d: self.visible("token"), "the login form after logging out")

    def go(self, page: str) -> None:
        """Follows a link of the navigation bar, as a person would."""
        self.driver.find_element(By.CSS_SELECTOR, f'nav a[data-page="{page}"]').click()
        self.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-page") == page, f"the {page} page")

    def visible(self, id: str):
        e = self.driver.find_element(By.ID, id)
        return e if e.is_displayed() else None

    def wait(self, until, what: str, timeout: float = 60):
        return WebDriverWait(self.driver, timeout, poll_frequency=0.25,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
            until, f"waited {timeout} s for {what}")

    def text(self, css: str) -> str:
        return self.wait(lambda d: d.find_element(By.CSS_SELECTOR, css).text, css)

    def shoot(self, name: str) -> None:
        self.driver.save_screenshot(str(self.shots / f"{name}.png"))

    def console(self) -> list:
        """What the console said since last asked."""
        return self.driver.get_log("browser")

    def errors(self) -> list:
        return [e for e in self.console() if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    shots = Path(os.environ.get("ALLIANCE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    b = Browser(shots)
    try:
        yield b
    finally:
        b.driver.quit()


@pytest.fixture
def page(browser):
    """The browser, checked for console errors after the test."""
    browser.console()
    yield browser
    errors = browser.errors()
    assert not errors, f"the browser's console has errors: {errors}"


def state_of(b: Browser, row_css: str) -> str:
    return b.driver.find_element(By.CSS_SELECTOR, f"{row_css} .gpu-state .badge").text


def test_a_bad_token_is_refused_and_a_good_one_logs_in(net, page):
    page.driver.get(net.url + "/")
    page.wait(lambda d: page.visible("token"), "the login form")
    page.shoot("login")
    page.driver.find_element(By.ID, "token").send_keys("not-a-token")
    page.driver.find_element(By.ID, "login-button").click()
    assert "does not know this token" in page.text("#login-error")
    # The browser logs the refused request itself; nothing else may be there.
    refused = page.errors()
    assert refused and all("/v1/me" in e["message"] and "401" in e["message"] for e in refused), refused
    page.driver.find_element(By.ID, "token").clear()
    page.open(net, net.admin_token)
    assert page.text("#who") == "node (admin)"
    assert page.text("#peer-id") == net.admin._get("/v1/status")["peer_id"]
    page.logout()


def test_a_researcher_watches_a_job_until_the_jobs_page_shows_it_done(net, page):
    me = "dash-researcher"
    c = net.user(me)
    job = double_job(c, np.arange(12, dtype=np.float32).reshape(3, 4), tasks=3, redundancy=2,
                     name="dashboard")
    page.open(net, net.token(me))
    page.go("jobs")
    assert page.text("#page h1") == f"{me}'s jobs"
    row = f'tr[data-job="{job.id}"]'
    page.wait(lambda d: d.find_element(By.CSS_SELECTOR, row), "the job's row")
    page.wait(lambda d: d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "done",
              "the job to show done", timeout=SLOW)
    bar = page.driver.find_element(By.CSS_SELECTOR, f'{row} [role="progressbar"]')
    assert bar.get_attribute("aria-valuenow") == "3" and bar.get_attribute("aria-valuemax") == "3"
    assert page.text(f"{row} .job-state") == "done"
    # A researcher sees their own jobs only.
    owners = {e.text for e in page.driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr td:nth-child(3)")}
    assert owners == {me}, owners
    page.shoot("jobs")

    page.driver.find_element(By.CSS_SELECTOR, f"{row} a").click()
    page.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tasks tbody tr[data-task]")) == 3, "the job's tasks")
    verified = page.driver.find_elements(By.CSS_SELECTOR, "#tasks tbody tr td:nth-child(2) .badge")
    assert [v.text for v in verified] == ["verified"] * 3
    workers = {r["institution"] for t in c._get(f"/v1/jobs/{job.id}")["tasks"] for r in t["replicas"]}
    replicas = page.text("#tasks")
    assert workers and all(w in replicas for w in workers), (workers, replicas)
    page.shoot("job")
    page.logout()


def test_an_admin_pauses_a_gpu_and_the_alliance_sees_it(net, page):
    worker = net.node("worker-north")
    peer = worker.admin._get("/v1/status")["peer_id"]
    try:
        # Someone who is not the worker's admin sees its GPUs but no switch.
        page.open(worker, worker.token("dash-viewer"))
        page.wait(lambda d: d.find_element(By.CSS_SELECTOR, '#gpus tr[data-gpu="0"]'), "the worker's GPUs")
        assert not page.driver.find_elements(By.XPATH, "//button[text()='Pause']")
        page.logout()

        page.open(worker, worker.admin_token)
        gpu = '#gpus tr[data-gpu="0"]'
        page.wait(lambda d: state_of(page, gpu) in ("Idle", "Busy"), "GPU 0 to be lent")
        page.driver.find_element(By.CSS_SELECTOR, f"{gpu} button").click()
        page.wait(lambda d: state_of(page, gpu) == "Paused", "GPU 0 to show paused")
        assert page.driver.find_element(By.CSS_SELECTOR, f"{gpu} button").text == "Resume"
        assert worker.admin._get("/v1/worker")["states"][0]["paused"] is True
        page.shoot("node")
        page.logout()

        # The submitting node hears of it through the worker's advert.
        page.open(net, net.admin_token)
        page.go("alliance")
        theirs = f'#alliance-gpus tr[data-peer="{peer}"][data-gpu="0"]'
        page.wait(lambda d: state_of(page, theirs) == "Paused", "the alliance page to show the GPU paused")
        assert int(page.text("#tile-paused .n")) >= 1
        assert page.driver.find_elements(By.CSS_SELECTOR, '#capacity-chart polygon[data-layer="paused"]')
        page.shoot("alliance")
        page.logout()

        page.open(worker, worker.admin_token)
        page.driver.find_element(By.CSS_SELECTOR, f"{gpu} button").click()
        page.wait(lambda d: state_of(page, gpu) in ("Idle", "Busy"), "GPU 0 to be lent again")
        page.logout()
    finally:
        worker.admin._post("/v1/worker/resume", None)


def test_reputation_and_credits_are_drawn(net, page):
    # The researcher's job above ran each task twice, on two institutions'
    # workers: their results were compared, and credits issued.
    page.open(net, net.admin_token)
    page.go("trust")
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#credits-chart rect[data-given]"), "the credits chart",
              timeout=120)
    balances = net.admin._get("/v1/credits")
    givers = {b["institution"] for b in balances if b["given_s"] > 0}
    drawn = {e.get_attribute("data-given") for e in page.driver.find_elements(By.CSS_SELECTOR, "#credits-chart rect[data-given]")}
    assert givers and givers <= drawn, (givers, drawn)
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#reputation-workers tbody tr td:nth-child(7)"), "the workers")
    workers = net.admin._get("/v1/reputation")["workers"]
    assert len(page.driver.find_elements(By.CSS_SELECTOR, "#reputation-workers tbody tr")) == len(workers)
    page.shoot("trust")
    # An admin's jobs page lists every user's.
    page.go("jobs")
    assert page.text("#page h1") == "Every job on this node"
    owners = page.wait(lambda d: {e.text for e in d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr td:nth-child(3)")},
                       "the jobs")
    assert {j["owner"] for j in net.admin._get("/v1/jobs")["jobs"]} == owners
    page.shoot("jobs-all")
    page.logout()
