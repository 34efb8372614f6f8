"""Drives Cordon's operator console in a real headless Chromium (Selenium, Debian's chromium-driver).

Run by tests/tests/console.rs with the console's URL, an auditor's and an operator's admin tokens, the
tailnet id, a CI run's id and a directory for screenshots and page sources. Each check prints `ok <name>`;
the first failure raises. Between steps it prints `READY <what>` and waits for a line on stdin, so that
the Rust side can make something happen (a live event) while the page is open.

    python3 console_check.py URL AUDITOR_TOKEN OPERATOR_TOKEN TAILNET RUN_ID OUT_DIR
"""

import os
import sys

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

url, auditor, operator, tailnet, run_id, out = sys.argv[1:7]
XSS_SCRIPT = "<script>window.__xss=1</script>"
XSS_IMG = '"><img src=x onerror="window.__xss=2">'


def ok(name):
    print("ok", name, flush=True)


def browser():
    options = webdriver.ChromeOptions()
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]:
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def save(driver, name):
    driver.save_screenshot(os.path.join(out, f"console-{name}.png"))
    with open(os.path.join(out, f"{name}.html"), "w") as f:
        f.write(driver.page_source)


def no_injection(driver, where):
    assert driver.execute_script("return window.__xss") is None, f"script ran on {where}"
    assert not driver.find_elements(By.CSS_SELECTOR, "main img"), f"an <img> was injected on {where}"
    assert not driver.find_elements(By.CSS_SELECTOR, "main script"), f"a <script> was injected on {where}"


def sign_in(driver, token):
    driver.get(url + "/login")
    driver.find_element(By.NAME, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.ID, "tailnets"))


driver = browser()
try:
    driver.get(url + "/")
    assert driver.current_url.endswith("/login"), driver.current_url
    driver.find_element(By.NAME, "token").send_keys("cordon-admin-not-a-real-token")
    driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    # The form posts and the refusal page replaces the login page: wait for it, do not read the old one.
    WebDriverWait(driver, 10).until(lambda d: "not a valid admin token" in d.page_source)
    assert "not-a-real-token" not in driver.page_source
    ok("a wrong token is refused without repeating it")

    sign_in(driver, auditor)
    table = driver.find_element(By.ID, "tailnets").text
    assert "console-demo" in table and "acme" in table, table
    save(driver, "tailnets")
    ok("tailnets")

    driver.get(f"{url}/tailnets/{tailnet}")
    nodes = driver.find_element(By.ID, "nodes").text
    assert "runner" in nodes and "laptop" in nodes, nodes
    assert "CI run" in nodes and "acme/api" in nodes, nodes
    keys = driver.find_element(By.ID, "keys").text
    assert XSS_SCRIPT in keys and XSS_IMG in keys, keys
    no_injection(driver, "the tailnet page")
    assert not driver.find_elements(By.CSS_SELECTOR, "form.act"), "an auditor is offered no actions"
    assert "key set (write-only)" in driver.find_element(By.ID, "upstreams").text
    save(driver, "tailnet")
    ok("tailnet: nodes, identities, keys as text, no actions for an auditor")

    # Live: the page is open; the test makes an event and it appears without a reload.
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-connected") == "yes")
    print("READY live", flush=True)
    sys.stdin.readline()
    WebDriverWait(driver, 15).until(lambda d: "key_created" in d.find_element(By.ID, "live").text)
    ok("live events without a reload")

    driver.get(f"{url}/run?tailnet={tailnet}&run={run_id}")
    timeline = driver.find_element(By.ID, "timeline").text
    assert "shell.exec" in timeline and "blocked" in timeline, timeline
    assert "<script>alert(1)</script>" in timeline, timeline
    assert "gpt-4o-mini" in timeline and "allowed" in timeline, timeline
    no_injection(driver, "the run page")
    save(driver, "run")
    ok("run: requests, the blocked tool call and its arguments as text")

    driver.get(f"{url}/requests?tailnet={tailnet}")
    assert len(driver.find_elements(By.CSS_SELECTOR, "figure.chart svg")) == 3
    spend = driver.find_element(By.ID, "spend").text
    assert "tokens" in spend and not spend.startswith("0 requests"), spend
    requests = driver.find_element(By.ID, "requests").text
    assert "run 1234567" in requests and "alice@acme.com" in requests, requests
    no_injection(driver, "the requests page")
    save(driver, "requests")
    ok("requests and spend, with SVG charts")

    driver.find_element(By.CSS_SELECTOR, "form.logout button").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/login"))
    sign_in(driver, operator)
    driver.get(f"{url}/tailnets/{tailnet}")
    row = [r for r in driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr") if "laptop" in r.text][0]
    row.find_element(By.NAME, "reason").send_keys("decommissioned laptop")
    row.find_element(By.CSS_SELECTOR, "form.act button").click()
    # The form posts and the console redirects back: wait for the old page to go, then for the new one.
    WebDriverWait(driver, 10).until(staleness_of(row))
    settled = WebDriverWait(driver, 10, ignored_exceptions=[NoSuchElementException, StaleElementReferenceException])
    settled.until(lambda d: "laptop" not in d.find_element(By.ID, "nodes").text)
    ok("an operator deletes a node with a reason")
finally:
    driver.quit()
