"""hub serving: real HTTP on loopback with real weights and photos, micro-batching, bad requests."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from conftest import CAT_CLASSES, ESPRESSO_CLASS

from hubkit.serving import create_app, free_port, wait_until_ready

MODULE = "efficientnet_lite0"


def _post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _multipart(filename: str, data: bytes, **fields: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_cli_server_predicts_photos_and_survives_bad_requests(lite0_server, photos):
    base, server = lite0_server.url, lite0_server.process
    health = _get(f"{base}/health")
    assert health["status"] == "ok" and health["modules"] == [MODULE]
    loaded = _get(f"{base}/v1/modules")["modules"]
    assert [(m["name"], m["version"], m["num_labels"], m["input_size"]) for m in loaded] == \
        [(MODULE, "1.0.0", 1000, [3, 224, 224])]
    predict = f"{base}/v1/modules/{MODULE}/predict"

    status, cat = _post(predict, *_multipart("chelsea.jpg", photos["cat"].read_bytes(), top_k="3"))
    assert status == 200 and len(cat["top_k"]) == 3
    assert cat["top_k"][0]["index"] in CAT_CLASSES
    body = json.dumps({"image": base64.b64encode(photos["espresso"].read_bytes()).decode(), "top_k": 1}).encode()
    status, espresso = _post(predict, body, "application/json")
    assert status == 200 and [c["index"] for c in espresso["top_k"]] == [ESPRESSO_CLASS]
    assert espresso["top_k"][0]["label"] == "espresso"

    status, error = _post(predict, *_multipart("notes.txt", b"this is not an image"))
    assert status == 400 and "not an image" in error["error"]
    status, error = _post(f"{base}/v1/modules/no_such_module/predict", body, "application/json")
    assert status == 404 and "no_such_module" in error["error"] and MODULE in error["error"]
    status, error = _post(predict, b'{"image": "not base64!"}', "application/json")
    assert status == 400 and "base64" in error["error"]

    assert server.poll() is None
    assert _get(f"{base}/health")["stats"][MODULE]["requests"] == 2  # the bad ones never reached the model


async def _predict_concurrently(app, photos, count: int) -> list:
    import httpx

    payloads = [base64.b64encode(photos[kind].read_bytes()).decode() for kind in ("cat", "espresso")]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serving.test", timeout=120) as client:
        responses = await asyncio.gather(*(client.post(f"/v1/modules/{MODULE}/predict",
                                                       json={"image": payloads[i % 2], "top_k": 1})
                                           for i in range(count)))
        stats = (await client.get("/v1/stats")).json()[MODULE]
    return [(r.status_code, r.json()) for r in responses], stats


@pytest.mark.slow
def test_concurrent_requests_are_batched_together(lite0, photos):
    app = create_app(lite0, max_batch=8, max_wait_ms=500)
    results, stats = asyncio.run(_predict_concurrently(app, photos, 8))
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["top_k"][0]["index"] in (CAT_CLASSES if i % 2 == 0 else {ESPRESSO_CLASS})
    assert stats["requests"] == 8
    assert stats["largest_batch"] >= 2 and stats["batches"] < 8
    assert max(body["batch_size"] for _, body in results) == stats["largest_batch"]

    unbatched = create_app(lite0, batching=False)
    results, stats = asyncio.run(_predict_concurrently(unbatched, photos, 4))
    assert [status for status, _ in results] == [200] * 4
    assert stats["batches"] == 4 and stats["batch_sizes"] == {"1": 4}


async def _send(app, method: str, path: str, **kwargs):
    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving.test") as client:
        response = await client.request(method, path, **kwargs)
    return response.status_code, response.json()


def _huge_png() -> bytes:
    """A 46 kB PNG that would decode to 48 megapixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_requests_get_clear_4xx_answers(lite0, photos):
    app = create_app(lite0, max_body_bytes=200_000)
    predict = f"/v1/modules/{MODULE}/predict"
    jpeg = photos["cat"].read_bytes()
    cases = [
        ({"content": b"x" * 300_000, "headers": {"Content-Type": "application/json"}}, 413, "larger than the limit"),
        ({"content": b"name=cat", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 415, "content type"),
        ({"content": b'{"image": ', "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"json": {"top_k": 3}}, 400, 'missing field "image"'),
        ({"json": {"image": base64.b64encode(jpeg).decode(), "top_k": 0}}, 422, "between 1 and 1000"),
        ({"json": {"image": base64.b64encode(jpeg).decode(), "top_k": "five"}}, 422, "integer"),
        ({"json": {"image": base64.b64encode(jpeg[:2000]).decode()}}, 400, "corrupt or truncated"),
        ({"files": {"other": ("x.jpg", jpeg)}}, 400, 'missing file field "file"'),
        ({"files": {"file": ("empty.jpg", b"")}}, 400, "empty"),
        ({"files": {"file": ("bomb.png", _huge_png())}}, 413, "8000x6000 pixels"),
    ]
    for kwargs, status, message in cases:
        got_status, body = asyncio.run(_send(app, "POST", predict, **kwargs))
        assert (got_status, message in body.get("error", "")) == (status, True), (kwargs.keys(), body)
    status, body = asyncio.run(_send(app, "GET", "/no/such/route"))
    assert status == 404 and "error" in body
    assert app.state.batchers[MODULE].stats.requests == 0


def test_the_server_preprocesses_and_answers_exactly_like_predict(lite0, photos, tmp_path):
    """A large JPEG upload is decoded at reduced scale like ``Module.predict`` decodes the file, and
    answered with the same top-k (one preprocessing, one top-k formatting)."""
    from PIL import Image

    big = tmp_path / "big_cat.jpg"
    cat = Image.open(photos["cat"]).convert("RGB")
    cat.resize((cat.width * 7, cat.height * 7), Image.BICUBIC).save(big, quality=92)
    data = big.read_bytes()
    assert torch.equal(lite0.preprocess(data), lite0.preprocess(big))
    expected = lite0.predict([big], top_k=5)[0].to_dict()["top_k"]
    app = create_app(lite0, batching=False)
    status, body = asyncio.run(_send(app, "POST", f"/v1/modules/{MODULE}/predict",
                                     json={"image": base64.b64encode(data).decode(), "top_k": 5}))
    assert status == 200, body
    assert [c["index"] for c in body["top_k"]] == [c["index"] for c in expected]
    assert [c["label"] for c in body["top_k"]] == [c["label"] for c in expected]
    assert [c["probability"] for c in body["top_k"]] == pytest.approx([c["probability"] for c in expected], abs=2e-6)


def test_waiting_for_a_server_that_died_or_never_answers_fails_with_a_typed_error():
    from hubkit.errors import ServerNotReadyError

    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    died = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    died.wait(timeout=30)
    with pytest.raises(ServerNotReadyError, match="exited with status 3"):
        wait_until_ready(base, process=died)
    with pytest.raises(TimeoutError, match="did not answer /health within 0.5 s"):
        wait_until_ready(base, timeout=0.5)


def test_also_a_client_that_hangs_up_mid_request_is_one_log_line(lite0, caplog):
    """Slow clients that disconnect used to log a full "Exception in ASGI application" traceback each."""
    import logging
    import socket
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lite0), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    caplog.set_level(logging.INFO)
    thread.start()
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=60)
        starts = {"application/json": b'{"image": "' + b"A" * 1000,
                  "multipart/form-data; boundary=x": b'--x\r\nContent-Disposition: form-data; name="file"; '
                                                     b'filename="a.jpg"\r\n\r\n' + b"\xff" * 1000}
        for content_type, start in starts.items():  # a tenth of the body announced, then the client hangs up
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(f"POST /v1/modules/{MODULE}/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                               "Content-Length: 100000\r\n\r\n".encode() + start)
                time.sleep(0.3)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum("disconnected" in r.getMessage() for r in caplog.records) < 2:
            time.sleep(0.1)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Exception in ASGI application" in m], messages
    assert not [r for r in caplog.records if r.exc_info], "no traceback is logged"
    hung_up = [m for m in messages if "disconnected before sending its whole request" in m]
    assert len(hung_up) == 2 and all("\n" not in m for m in hung_up), messages


@pytest.mark.slow
def test_the_page_at_root_classifies_a_dropped_photo_in_a_real_browser(lite0_server, photos, browser, tmp_path):
    from selenium.webdriver.common.by import By  # noqa: PLC0415 (selenium is optional: `browser` skips without it)
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    base = lite0_server.url
    with urllib.request.urlopen(base + "/", timeout=10) as response:
        html = response.read().decode()
    assert "<script src" not in html and "<link" not in html and "http" not in html.split("<script>")[1]  # offline
    browser.get(base + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert browser.find_element(By.ID, "module").get_attribute("value") == MODULE
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false", upload)  # a hidden file input takes no keys
    upload.send_keys(str(photos["cat"]))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rows .row"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#rows .row")
    assert len(rows) == 5 and int(rows[0].get_attribute("data-index")) in CAT_CLASSES
    assert "cat" in rows[0].find_element(By.CLASS_NAME, "label").text
    assert browser.find_element(By.ID, "latency").text.endswith(")") and " ms " in browser.find_element(By.ID, "latency").text
    screenshot = (Path(__file__).parent.parent / "docs" if os.environ.get("HUBKIT_UPDATE_SCREENSHOTS") else tmp_path)
    browser.save_screenshot(str(screenshot / "serving-page.png"))  # HUBKIT_UPDATE_SCREENSHOTS=1: the README's picture
