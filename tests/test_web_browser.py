"""``g4seg serve`` in a real browser: headless Debian Chromium driven by Playwright, against a server this
module starts on 127.0.0.1 (a free port) with the shipped toy models (64 px, fast on a CPU).

Covered: upload an image, paint a mask with the mouse (brush, then eraser), refine, download the label
PNG and compare it byte for byte with ``g4seg refine`` on the same image and the coarse mask the page
used; a bad upload shows the CLI's one-line message and the page keeps working; two browser contexts
refining different inputs at once each get their own result. Screenshots go to ``$G4SEG_ARTIFACTS``
(default: the test's tmp_path) and are listed in the output (``pytest -s``). Skipped only when Chromium
or Playwright is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from g4seg.cli import app

CHROMIUM = Path("/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (extra web-test)")
if not CHROMIUM.is_file():
    pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian package chromium)", allow_module_level=True)

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOY = ["--backbone", "toy", "--extractor", "toy-clip", "--device", "cpu"]
START_TIMEOUT = 120
REFINE_TIMEOUT_MS = 90_000
MAX_UPLOAD_MB = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``g4seg serve`` on the toy models in a subprocess; its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(log.parent)}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "g4seg", "serve", "--port", str(port),
                                    "--max-upload-mb", str(MAX_UPLOAD_MB), *TOY],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"g4seg serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=30)
    assert not list(log.parent.glob("g4seg-serve-*")), "the server's temporary folder was not removed on exit"


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("G4SEG_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from g4seg.web.examples import toy_examples

    return toy_examples(tmp_path_factory.mktemp("examples"))


def _open(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#refine")
    return context, page


def _status(page) -> str:
    return page.locator("#status textarea").input_value()


def _upload(page, selector: str, path: Path) -> None:
    page.locator(f"{selector} input[type=file]").set_input_files(str(path))


def _upload_image(page, path: Path) -> None:
    _upload(page, "#image-file", path)
    page.wait_for_function("document.querySelector('#status textarea').value.startsWith('image ')")


def _refine(page) -> str:
    """Click Refine and wait for the outcome line (a summary or an error)."""
    page.locator("#status textarea").evaluate("(e) => { e.value = ''; }")
    page.click("#refine")
    page.wait_for_function("(() => { const v = document.querySelector('#status textarea').value; "
                           "return v.includes('changed label') || v.startsWith('g4seg: error'); })()",
                           timeout=REFINE_TIMEOUT_MS)
    return _status(page)


def _downloads(page, context, folder: Path) -> dict[str, Path]:
    """The files offered for download, fetched through the page's own links."""
    folder.mkdir(parents=True, exist_ok=True)
    page.wait_for_selector("#downloads a")
    files = {}
    for link in page.locator("#downloads a").all():
        name = link.inner_text().strip().split("\n")[0]
        with page.expect_download() as info:
            link.click()
        target = folder / f"{len(files)}_{info.value.suggested_filename}"
        info.value.save_as(target)
        files[name] = target
    return files


def _shot(page, artifacts: Path, name: str) -> Path:
    path = artifacts / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _cli_labels(image: Path, mask: Path, classes: str, out: Path) -> bytes:
    result = CliRunner().invoke(app, ["refine", str(image), "--mask", str(mask), "--classes", classes,
                                      "--out", str(out), *TOY])
    assert result.exit_code == 0, result.output
    return (out / f"{image.stem}.png").read_bytes()


def _pick(files: dict[str, Path], suffix: str, coarse: bool = False) -> Path:
    """The downloaded file with ``suffix``: the label PNG, or with ``coarse`` the coarse label PNG."""
    return next(p for p in files.values() if p.suffix == suffix and p.stem.endswith("_coarse") == coarse)


def test_upload_paint_refine_download_equals_the_cli(server, browser, artifacts, examples, tmp_path):
    context, page = _open(browser, server)
    image = examples[0].image
    _upload_image(page, image)
    page.fill("#classes textarea", "ball,star")
    page.get_by_role("button", name="Brush", exact=True).click()
    box = page.locator("#painter canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    # few mouse events: the editor redraws its canvas on each, slowly in a GPU-less headless browser
    page.mouse.move(cx - 80, cy - 20)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 20, steps=4)
    page.mouse.up()
    page.get_by_role("button", name="Erase", exact=True).click()
    page.mouse.move(cx - 10, cy - 60)
    page.mouse.down()
    page.mouse.move(cx - 10, cy + 60, steps=2)
    page.mouse.up()
    status = _refine(page)
    _shot(page, artifacts, "web-painted")
    assert "changed label" in status, status
    files = _downloads(page, context, tmp_path / "downloads")
    labels, coarse = _pick(files, ".png"), _pick(files, ".png", coarse=True)
    painted = np.asarray(Image.open(coarse))
    assert set(np.unique(painted)) == {0, 1}  # brush colour 1 = the first class
    stroke_rows = np.flatnonzero((painted == 1).any(axis=1))
    gap = [c for c in range(painted.shape[1]) if not (painted[:, c] == 1).any()]
    first, last = np.flatnonzero((painted == 1).any(axis=0))[[0, -1]]
    assert len(stroke_rows) >= 3 and any(first < c < last for c in gap)  # the eraser cut the stroke in two
    mask = tmp_path / "painted.png"
    shutil.copyfile(coarse, mask)
    assert labels.read_bytes() == _cli_labels(image, mask, "ball,star", tmp_path / "cli")
    npz = np.load(_pick(files, ".npz"))
    assert list(npz["classes"]) == ["ball", "star"] and npz["probs"].shape == (2, 64, 64)
    context.close()


def test_bad_upload_shows_the_cli_message_and_the_page_keeps_working(server, browser, artifacts, examples, tmp_path,
                                                                     monkeypatch):
    context, page = _open(browser, server)
    example = examples[1]
    _upload_image(page, example.image)
    page.fill("#classes textarea", example.classes)
    page.get_by_label("upload a mask file").check()
    wrong = tmp_path / "coarse.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(wrong)
    _upload(page, "#mask-file", wrong)
    page.wait_for_selector("#mask-file a")
    status = _refine(page)
    _shot(page, artifacts, "web-bad-upload")
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(example.image, tmp_path / "scene.png")
    cli = CliRunner().invoke(app, ["refine", "scene.png", "--mask", "coarse.png", "--classes", example.classes,
                                   "--out", "out", *TOY])
    assert cli.exit_code == 1
    assert status == cli.output.strip()
    too_big = tmp_path / "big.png"
    too_big.write_bytes(np.random.default_rng(0).bytes(int(MAX_UPLOAD_MB * 2**20) + 1))
    _upload(page, "#truth-file", too_big)
    page.get_by_text("exceed the maximum allowed size").first.wait_for()
    page.locator("#mask-file button[aria-label='Clear']").first.click()
    _upload(page, "#mask-file", example.coarse)
    page.wait_for_selector("#mask-file a")
    assert "changed label" in _refine(page)
    context.close()


def test_two_browsers_refining_at_once_get_their_own_results(server, browser, artifacts, examples, tmp_path):
    chosen = [examples[0], examples[2]]
    pages = []
    for n, example in enumerate(chosen):
        context, page = _open(browser, server)
        if n == 0:  # the first bundled example, picked on the page: its files, classes and the toy models
            page.click("#load-example")
            page.wait_for_function("document.querySelector('#status textarea').value.startsWith('image ')")
        else:
            _upload_image(page, example.image)
            page.fill("#classes textarea", example.classes)
            page.get_by_label("upload a mask file").check()
            _upload(page, "#mask-file", example.coarse)
            _upload(page, "#truth-file", example.truth)
        page.wait_for_selector("#mask-file a")
        page.wait_for_selector("#truth-file a")
        pages.append((context, page))
    for _, page in pages:
        page.locator("#status textarea").evaluate("(e) => { e.value = ''; }")
        page.click("#refine")
    # what `g4seg refine` gives for both, in one run (a folder of images and one of masks, by stem)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for n, example in enumerate(chosen):
        shutil.copyfile(example.image, tmp_path / "images" / f"scene{n}.png")
        shutil.copyfile(example.coarse, tmp_path / "masks" / f"scene{n}.png")
    cli = CliRunner().invoke(app, ["refine", str(tmp_path / "images"), "--mask", str(tmp_path / "masks"),
                                   "--classes", chosen[0].classes, "--out", str(tmp_path / "cli"), *TOY])
    assert cli.exit_code == 0, cli.output
    for n, (context, page) in enumerate(pages):
        page.wait_for_function("document.querySelector('#status textarea').value.includes('changed label')",
                               timeout=REFINE_TIMEOUT_MS)
        _shot(page, artifacts, f"web-concurrent-{n}")
        files = _downloads(page, context, tmp_path / f"downloads{n}")
        assert _pick(files, ".png").read_bytes() == (tmp_path / "cli" / f"scene{n}.png").read_bytes()
        assert "mIoU" in page.locator("#iou").inner_text()
        context.close()
    assert (tmp_path / "cli" / "scene0.png").read_bytes() != (tmp_path / "cli" / "scene1.png").read_bytes()
