"""The rating page in a real browser: Debian's headless Chromium driven by selenium, opened from file://.

A study is made from real predictions (a phantom scan through the bundled model on a region of
interest, its bicubic upsampling, and a smoothed copy), every trial is rated with clicks and keys,
the page is reloaded halfway, the ratings are exported through the page's own button and `report`
runs on the downloaded CSV; its statistics are checked against scipy on what the test clicked.

Chromium missing is a failure, not a skip (`.ci/run` installs it). With MICROSR_RATING_DOCS=DIR the
page screenshot and the boxplot are also copied to DIR (how the README's figures are made).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage, stats

from microsr_tf.cli.main import cli
from microsr_tf.demo import BUNDLED_MODEL
from microsr_tf.evaluation.rating_study import make_study
from microsr_tf.export import load_model
from microsr_tf.inference.predict import predict_volume
from microsr_tf.phantoms import write_phantoms
from microsr_tf.preprocessing import resample_slice
from microsr_tf.volumes import write_volume

pytestmark = pytest.mark.slow

BUNDLED = BUNDLED_MODEL  # the demo's model, in saved_models/
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900"]
ROI = ((3, 21), (3, 21), (22, 26))  # LR voxels: 18 x 18 in-plane (144 x 144 at 8x), 4 slices
RATER = "Dr. Ada Lovelace, ENT"  # a comma: the export must quote it
# What the scripted rater gives each method: (resolution and noise, shape and structure) before a
# per-slice wobble of -1, 0 or +1.
PLAN = {"cyclegan": (5, 5), "bicubic": (2, 3), "smoothed": (3, 2)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("rating_browser")
    write_phantoms(root / "phantoms", subjects=1, seed=3)
    (lr,) = sorted((root / "phantoms" / "test" / "lr").glob("*.nii.gz"))
    generator, meta = load_model(BUNDLED)
    predict_volume(lr, generator, meta, root / "cyclegan", samples=4, seed=0, roi=ROI)
    mean_name = lr.name.replace(".nii.gz", "_mean.nii.gz")
    pred = nib.load(root / "cyclegan" / mean_name)
    lr_arr = np.asarray(nib.load(lr).dataobj, dtype=np.float32)
    (i0, i1), (j0, j1), (k0, k1) = ROI
    bicubic = np.stack([resample_slice(lr_arr[i0:i1, j0:j1, k], (8, 8)) for k in range(k0, k1)], axis=-1)
    for method in ("bicubic", "smoothed"):
        (root / method).mkdir()
    write_volume(root / "bicubic" / mean_name, bicubic, pred.affine, header=pred.header)
    write_volume(root / "smoothed" / mean_name, ndimage.gaussian_filter(pred.get_fdata(), (3, 3, 0)), pred.affine,
                 header=pred.header)
    result = make_study(lr, [f"{m}={root / m}" for m in PLAN], root / "study", n_slices=4, seed=11)
    key = json.loads(result.key.read_text())
    return result, key


@pytest.fixture
def browser(tmp_path):
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("the rating-page tests need headless Chromium: `apt-get install chromium chromium-driver` "
                    f"(found chromium={chromium}, chromedriver={driver_path}; see README, Set up)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path, prefix='chromium-')}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # explicit paths: no driver download
    try:
        yield driver, downloads
    finally:
        driver.quit()


def planned(trial: dict, slices: list[int]) -> list[int]:
    wobble = (slices.index(trial["slice"]) % 3) - 1
    return [int(np.clip(v + wobble * (1 if c == 0 else -1), 1, 6)) for c, v in enumerate(PLAN[trial["method"]])]


def wait_for_download(folder: Path, timeout: float = 20.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.iterdir() if p.suffix == ".csv"]
        if done and not any(p.name.endswith(".crdownload") for p in folder.iterdir()):
            return done[0]
        time.sleep(0.1)
    raise AssertionError(f"no CSV was downloaded to {folder} within {timeout} s: {list(folder.iterdir())}")


def test_rate_every_trial_reload_export_and_report(study, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    result, key = study
    driver, downloads = browser
    trials, slices = key["trials"], key["slices"]
    n, half = len(trials), len(trials) // 2
    plan = {t["trial"]: planned(t, slices) for t in trials}
    criteria = key["criteria"]

    def current() -> str:
        return driver.execute_script("return document.body.dataset.trial")

    def shown(criterion: str) -> int:
        pressed = driver.find_elements(By.CSS_SELECTOR, f'.star[data-criterion="{criterion}"][aria-pressed="true"]')
        return int(pressed[0].get_attribute("data-value")) if pressed else 0

    def click_star(criterion: str, value: int) -> None:
        driver.find_element(By.CSS_SELECTOR, f'.star[data-criterion="{criterion}"][data-value="{value}"]').click()

    def keys(*sequence) -> None:
        ActionChains(driver).send_keys(*sequence).perform()

    def progress() -> str:
        return driver.find_element(By.ID, "progress-text").text

    driver.get(result.page.as_uri())
    assert driver.title == f"Rating study {key['study_id']}"
    assert current() == trials[0]["trial"] and progress() == f"0 of {n} trials rated"
    assert "1-6" in driver.find_element(By.TAG_NAME, "aside").text.replace("\u2013", "-")  # shortcuts on the page

    driver.find_element(By.ID, "export").click()  # no name yet: refused, nothing downloaded
    assert driver.find_element(By.ID, "status").text == "Enter your name before exporting."
    name = driver.find_element(By.ID, "rater")
    name.send_keys(RATER, Keys.ENTER)  # Enter leaves the field, so the next keys rate

    for i in range(half):  # first half with the mouse; a complete trial moves on by itself
        tid = current()
        assert tid == trials[i]["trial"]  # the page shows the trials in the key's order
        click_star(criteria[0], plan[tid][0])
        assert current() == tid and shown(criteria[0]) == plan[tid][0]
        click_star(criteria[1], plan[tid][1])
        assert current() == trials[i + 1]["trial"]
    keys(Keys.ARROW_LEFT)  # change an earlier rating with the keyboard
    changed = trials[half - 1]["trial"]
    assert current() == changed
    plan[changed][0] = 7 - plan[changed][0]
    keys("a", str(plan[changed][0]))
    assert shown(criteria[0]) == plan[changed][0] and current() == changed  # complete already: no jump
    keys("n")
    assert current() == trials[half]["trial"]

    driver.refresh()  # ratings, rater and position survive a reload
    assert current() == trials[half]["trial"] and progress() == f"{half} of {n} trials rated"
    assert driver.find_element(By.ID, "rater").get_attribute("value") == RATER
    for i in reversed(range(half)):
        keys(Keys.ARROW_LEFT)
        assert current() == trials[i]["trial"]
        assert [shown(c) for c in criteria] == plan[trials[i]["trial"]]
    keys("u")  # next unrated
    assert current() == trials[half]["trial"]

    screenshot = tmp_path / "rating_study_page.png"
    for i in range(half, n):  # second half with the keyboard
        tid = current()
        assert tid == trials[i]["trial"]
        keys(str(plan[tid][0]))
        if trials[i]["method"] == "cyclegan" and not screenshot.exists():
            driver.save_screenshot(str(screenshot))
        keys(str(plan[tid][1]))
    assert progress() == f"{n} of {n} trials rated"
    assert driver.find_element(By.ID, "status").text.startswith(f"All {n} trials are rated")

    driver.find_element(By.ID, "export").click()
    exported = wait_for_download(downloads)
    assert exported.name == f"ratings-{key['study_id']}-Dr_Ada_Lovelace_ENT.csv"
    with open(exported, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trial"] for r in rows] == [t["trial"] for t in trials]
    assert all(r["study_id"] == key["study_id"] and r["rater"] == RATER for r in rows)
    assert {r["trial"]: [int(r[c]) for c in criteria] for r in rows} == plan
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no script errors and no blocked (network) loads

    out = tmp_path / "report"
    run = CliRunner().invoke(cli, ["rating-study", "report", str(exported), "--key", str(result.key),
                                   "--out", str(out)])
    assert run.exit_code == 0, run.output
    with open(out / "pairwise.csv", newline="", encoding="utf-8") as fh:
        report = {(r["criterion"], r["method_a"], r["method_b"]): r for r in csv.DictReader(fh)}
    methods = list(PLAN)
    assert len(report) == 2 * 3
    for c, criterion in enumerate(criteria):
        by_method = {m: {t["slice"]: plan[t["trial"]][c] for t in trials if t["method"] == m} for m in methods}
        for ia, a in enumerate(methods):
            for b in methods[ia + 1:]:
                row = report[criterion, a, b]
                xa, xb = list(by_method[a].values()), list(by_method[b].values())
                dominance = sum(np.sign(x - y) for x in xa for y in xb) / (len(xa) * len(xb))
                assert float(row["r_rank_biserial"]) == pytest.approx(dominance)
                assert float(row["p_rank_sum"]) == pytest.approx(stats.mannwhitneyu(xa, xb).pvalue, rel=1e-9)
                pa = [by_method[a][s] for s in slices]
                pb = [by_method[b][s] for s in slices]
                nonzero = sum(x != y for x, y in zip(pa, pb))
                assert int(row["n_pairs"]) == len(slices) and int(row["n_pairs_nonzero"]) == nonzero
                if nonzero:
                    assert float(row["p_signed_rank"]) == pytest.approx(stats.wilcoxon(pa, pb).pvalue, rel=1e-9)
                    r_plus = stats.wilcoxon(pa, pb, alternative="greater").statistic  # sum of positive ranks
                    total = nonzero * (nonzero + 1) / 2
                    assert float(row["r_matched_rank_biserial"]) == pytest.approx((2 * r_plus - total) / total)
    for png in (screenshot, out / "boxplots.png"):
        image = cv2.imread(str(png))
        assert image is not None and image.shape[0] > 300
    docs = os.environ.get("MICROSR_RATING_DOCS")
    if docs:
        shutil.copyfile(screenshot, Path(docs) / "rating_study_page.png")
        shutil.copyfile(out / "boxplots.png", Path(docs) / "rating_study_boxplots.png")
