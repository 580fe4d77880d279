"""Walks a ``bpjax explain --html`` page in headless Chromium and prints, as JSON, what it saw at
every stage (tests/test_explain_page.py runs it in its own process, so that Playwright's event
loop never shares a process with the other tests). Usage::

    python tests/explain_browser.py CHROMIUM PAGE.html SCREENSHOT.png
"""
import json
import sys

from playwright.sync_api import sync_playwright

SHOWN = """() => [...document.querySelectorAll('#arrays .array')].map(a => ({
    name: a.dataset.name,
    values: [...a.querySelectorAll('[data-value]')].map(c => Number(c.dataset.value)),
    text: [...a.querySelectorAll('td')].map(c => c.textContent),
    heat: a.querySelectorAll('.heat div').length}))"""


def main(chromium, page_path, screenshot):
    seen = {"requests": [], "stages": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.goto("file://" + page_path)
        seen["counter"] = page.inner_text("#counter")
        seen["nodes"] = page.locator(".node").count()
        curve = page.locator("#loss-curve polyline")
        seen["curve_points"] = len(curve.get_attribute("points").split()) if curve.count() else 0
        while True:
            seen["stages"].append({
                "title": page.inner_text("#stage-title"),
                "node": page.evaluate("() => document.querySelector('.node.active').dataset.index"),
                "arrays": page.evaluate(SHOWN)})
            if page.is_disabled("#next"):
                break
            page.click("#next")
        page.keyboard.press("ArrowLeft")
        seen["counter_after_back"] = page.inner_text("#counter")
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])
