"""report.html: a self-contained page (nothing fetched, Plotly inlined once), the summary before the
tables, tau cells on a diverging scale, and scatter points that name their checkpoint on hover;
then the page itself in headless Chromium, offline: it loads without a console error, renders every
plot, and hovering a point shows its checkpoint and hyperparameters.

The browser part needs Chromium and its driver (Debian: ``apt-get install chromium chromium-driver``;
CI installs them) and selenium (the test extra)."""
import json
import re
import shutil

import pytest

from sharpfast.study.analysis import report_html
from sharpfast.study.definitions import Definition
from sharpfast.study.analysis.report import build_report
from sharpfast.study.store import Store

DEFINITIONS = [Definition.from_dict(dict(kind="max", norm="linf", rho=r, n_iters=3, m=32, n_examples=64))
               for r in (0.0005, 0.001)]


def models(n=8):
    """Two architectures over learning rate and width; test error rising with the first definition."""
    out = []
    for i in range(n):
        hp = {"arch": ["mlp", "vit"][i % 2], "lr": [0.5, 2.0][(i // 2) % 2], "width": [8, 16][i // 4]}
        test, train = 0.1 + 0.02 * i, 0.001 * i
        out.append((f"ckpt-{i:02d}-{hp['arch']}", hp, {"test_error": test, "train_error": train,
                                                      "gap": test - train, "ood_error": 0.3 - 0.01 * i}))
    return out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    with Store(str(d / "r.db")) as st:
        st.put_definitions(DEFINITIONS)
        for i, (cid, hp, metrics) in enumerate(models()):
            rows = [dict(checkpoint_id=cid, definition_key=defn.key, status="ok", value=(k + 1) * (1.0 + i),
                         per_batch=[1.0], time_s=0.0) for k, defn in enumerate(DEFINITIONS)]
            st.put_results(dict(checkpoint_id=cid, sha256=None, factory="f", hparams=hp, metrics=metrics), rows)
    build_report(str(d / "r.db"), str(d / "out"), n_boot=50)
    return d / "out"


def test_the_page_is_self_contained_and_says_what_was_measured_first(report_dir):
    page = (report_dir / "report.html").read_text()
    # nothing fetched: no script, stylesheet or image from elsewhere, Plotly's JavaScript inlined once
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page)
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1
    summary, kendall, per_hp, plots = (page.index(s) for s in ("class='summary'", "<h2>Kendall tau", "<h2>Per hyper",
                                                               "<h2>Each definition"))
    assert summary < kendall < per_hp < plots
    assert "architectures mlp (4), vit (4)" in page[summary:kendall]
    assert "<dt>Definitions</dt><dd>2 reported of 2 in the store</dd>" in page
    # report.md keeps the static PNGs
    md = (report_dir / "report.md").read_text()
    assert md.count("](plots/") == 2 and all((report_dir / p).exists() for p in re.findall(r"\]\((plots/[^)]+)\)", md))


def test_tau_cells_are_coloured_on_a_diverging_scale_with_their_interval():
    assert report_html.tau_colour(1.0) == "rgb(178,24,43)" and report_html.tau_colour(-1.0) == "rgb(33,102,172)"
    assert report_html.tau_colour(0.0) == "rgb(255,255,255)" and report_html.tau_colour(float("nan")) == "#eeeeee"
    assert report_html.tau_colour(0.5) == "rgb(216,140,149)"   # halfway to red (216.5, rounded to even)
    from sharpfast.study.analysis.stats import BootstrapCI
    cell = report_html.tau_cell(BootstrapCI(tau=0.42, low=0.1, high=0.7, n_boot=20, level=0.95), "m vs test error")
    assert "+0.42" in cell and "[+0.10, +0.70]" in cell and "<svg" in cell
    assert "title='m vs test error: tau = +0.420, 95% bootstrap CI [+0.10, +0.70]'" in cell


def test_each_point_of_a_scatter_plot_carries_its_checkpoint_and_hyperparameters(report_dir):
    page = (report_dir / "report.html").read_text()
    starts = [m.end() for m in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", page)]
    figures = [json.JSONDecoder().raw_decode(page, i)[0] for i in starts]   # each figure's traces
    assert len(figures) == 2   # one per definition
    for traces in figures:
        texts = [t for tr in traces for t in tr["text"]]
        assert len(texts) == 3 * 8   # every checkpoint in each of the three targets' panels
        for cid, hp, _ in models():
            (about,) = {t for t in texts if f"<b>{cid}</b>" in t}
            assert all(f"{k} = {v}" in about for k, v in hp.items())
        # colour = lr, marker = architecture: lr=0.5 mlp and lr=0.5 vit differ
        legend = {tr["name"]: (tr["marker"]["color"], tr["marker"]["symbol"]) for tr in traces if tr["showlegend"]}
        assert legend["lr=0.5 mlp"][0] == legend["lr=0.5 vit"][0]
        assert legend["lr=0.5 mlp"][1] != legend["lr=0.5 vit"][1]


def _browser():
    chromium = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                    None)
    driver = shutil.which("chromedriver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is not installed")
    if not (chromium and driver):
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--host-resolver-rules=MAP * ~NOTFOUND",   # offline: no host resolves
              "--window-size=1400,2000"):
        options.add_argument(a)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def test_the_page_in_a_headless_browser_offline(report_dir, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get((report_dir / "report.html").as_uri())
        plotted = "return [...document.querySelectorAll('.js-plotly-plot')].filter(d => d._fullLayout).length"
        WebDriverWait(browser, 60).until(lambda b: b.execute_script(plotted) == 2)   # Plotly drew both
        points = browser.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .scatterlayer .trace .points path")
        assert len(points) == 2 * 3 * 8
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", points[0])
        ActionChains(browser).move_to_element(points[0]).perform()
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".hoverlayer .hovertext"))
        hover = " ".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, ".hoverlayer .hovertext"))
        assert re.search(r"ckpt-\d\d-(mlp|vit)", hover) and "lr = " in hover and "sharpness = " in hover
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    import matplotlib.image

    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert len(colours) > 50   # a page, not a blank
    # the tau cells' diverging colours are on screen: a red and a blue one
    assert any(r > g + 40 and r > b + 40 for r, g, b in colours) and any(b > r + 40 for r, g, b in colours)
