"""The page `recpipe serve` shows at GET /, in a real browser: Debian's chromium, headless, driven by Selenium
through /usr/bin/chromedriver (nothing downloads a browser). Skips, saying why, without them.

A person picks a user, types an intent and reads the ranked titles, scores and anchoring; builds a history by
searching titles; and sees a bad request's one-line reason on the page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                else None)
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`; "
                ".ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from test_serve import INTENTS, Server, expected, settings, train_run  # noqa: E402

from recpipe.serve.engine import ANCHOR_CHARS  # noqa: E402


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("serve-browser-run"))


@pytest.fixture(scope="module")
def reference(run_cfg):
    from recpipe.pipeline.recommend import RecommendService

    return RecommendService(run_cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def server(run_cfg):
    s = Server(settings(run_cfg))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    try:
        drv = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    except Exception as e:  # noqa: BLE001 - a browser that cannot start here is a skip, with its reason
        pytest.skip(f"chromium did not start headless: {str(e).splitlines()[0]}")
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def _wait(drv, cond, timeout=60):
    return WebDriverWait(drv, timeout).until(cond)


def _results(drv):
    return [(li.get_attribute("data-id"), li.find_element(By.CLASS_NAME, "title").text,
             li.find_element(By.CLASS_NAME, "score").text) for li in drv.find_elements(By.CSS_SELECTOR, "li.rec")]


def test_pick_a_user_type_an_intent_read_the_list(server, reference, browser, tmp_path):
    drv = browser
    drv.get(server.url + "/")
    _wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "idreamrec" in drv.find_element(By.ID, "status").text
    user = [u for u in reference.ds.users["user_id"] if u != "u0"][2]
    Select(drv.find_element(By.ID, "user")).select_by_value(user)
    drv.find_element(By.ID, "intent").send_keys(INTENTS[0])
    k = drv.find_element(By.ID, "k")
    k.clear()
    k.send_keys("5")
    drv.find_element(By.ID, "go").click()
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.rec")) == 5)
    want = expected(reference, user, INTENTS[0], k=5)
    assert _results(drv) == [(i, t or f"item {i}", f"{s:.3f}") for i, t, s in want]
    chips = [c.text for c in drv.find_elements(By.CSS_SELECTOR, ".anchor")]
    near = reference.anchored_to(INTENTS[0])
    assert chips and chips[0] == f"\"{near[0][0][:ANCHOR_CHARS]}\" {near[0][1]:.2f}"
    drv.save_screenshot(str(tmp_path / "page.png"))


def test_build_a_history_by_title_search(server, reference, browser):
    drv = browser
    drv.get(server.url + "/")
    _wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    def typable(u):  # titles a person can type (the test catalog has a few odd ones)
        return all(reference.titles[i - 1].startswith("Film number") for i in reference.ds.sequence(u))

    u = next(n for n, uid in enumerate(reference.ds.users["user_id"]) if uid != "u0" and typable(n))
    user, seq = reference.ds.users["user_id"].iloc[u], reference.ds.sequence(u)
    for i in seq:  # the user's own history, title by title, through the search box
        title = reference.titles[i - 1]
        box = drv.find_element(By.ID, "search")
        box.clear()
        box.send_keys(title)
        _wait(drv, lambda d, t=title: _click_hit(d, "+ " + t))
    assert len(drv.find_elements(By.CSS_SELECTOR, "#history button")) == len(seq)
    assert drv.find_element(By.CSS_SELECTOR, "input[value=history]").is_selected()
    drv.find_element(By.ID, "intent").send_keys(INTENTS[1])
    drv.find_element(By.ID, "go").click()
    _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.rec")) == 10)
    assert _results(drv) == [(i, t or f"item {i}", f"{s:.3f}") for i, t, s in expected(reference, user, INTENTS[1])]


def _click_hit(drv, text: str) -> bool:
    """Click the search hit labelled `text`; False (try again) while it is not there or was just re-rendered."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        hit = next((b for b in drv.find_elements(By.CSS_SELECTOR, "#hits button.hit") if b.text == text), None)
        if hit is None:
            return False
        hit.click()
        return True
    except StaleElementReferenceException:
        return False


def test_a_bad_request_shows_its_reason(server, browser):
    drv = browser
    drv.get(server.url + "/")
    _wait(drv, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    k = drv.find_element(By.ID, "k")
    k.clear()
    k.send_keys("0")
    drv.find_element(By.ID, "go").click()
    _wait(drv, lambda d: d.find_element(By.ID, "error").text != "")
    assert drv.find_element(By.ID, "error").text.startswith("error: k must be between 1 and")
    assert drv.find_elements(By.CSS_SELECTOR, "li.rec") == []
