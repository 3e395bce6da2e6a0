"""Storage URIs in --model_dir (issue 12 part 6): s3:// against a local S3 server (moto's server
mode on a loopback port), https:// archives from a local HTTP server, and the start-up errors.

The servers run in this process; hfserve runs as a real process (``python -m hfserve``) with
the endpoint in its environment, as in a KServe pod.
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import pathlib
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator

import pytest

from hfserve import storage
from hfserve.cli import build_parser, resolve
from hfserve.tasks import Task
from tests.servers import free_port, start_server, stop_server
from tests.test_cli import assert_one_line_error

BUCKET = "models"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def run_hfserve(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hfserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# ----------------------------------------------------------------------------- the local servers
@pytest.fixture(scope="module")
def s3(models) -> Iterator[dict[str, str]]:
    """A local S3 server holding bert_cls under s3://models/bert_cls/; yields hfserve's environment."""
    pytest.importorskip("kserve_storage")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=AWS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    for f in sorted(models["bert_cls"].iterdir()):
        client.upload_file(str(f), BUCKET, f"bert_cls/{f.name}")
    yield {**AWS, "AWS_ENDPOINT_URL": endpoint, "S3_MAX_ATTEMPTS": "1"}
    server.stop()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the archives as KServe's http(s) handler expects (Content-Type by extension);
    ``/slow/NAME`` sends NAME in small pieces, so a download takes a while."""

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        if not self.path.startswith("/slow/"):
            return super().do_GET()
        data = (pathlib.Path(self.directory) / self.path[len("/slow/"):]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        step = len(data) // 8 + 1
        for i in range(0, len(data), step):
            self.wfile.write(data[i : i + step])
            self.wfile.flush()
            time.sleep(0.25)


@pytest.fixture(scope="module")
def http_models(models, tmp_path_factory) -> Iterator[str]:
    """A local HTTP server with bert_cls as a .tar.gz (files at the top) and as a .zip (in one folder)."""
    pytest.importorskip("kserve_storage")
    root = tmp_path_factory.mktemp("http-models")
    src = models["bert_cls"]
    with tarfile.open(root / "bert_cls.tar.gz", "w:gz") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f.name)
    with zipfile.ZipFile(root / "bert_cls.zip", "w") as z:
        for f in sorted(src.iterdir()):
            z.write(f, arcname=f"bert_cls/{f.name}")
    with zipfile.ZipFile(root / "readme.zip", "w") as z:
        z.writestr("readme.txt", "no model here")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _predict(handle) -> list:
    with handle.client() as c:
        r = c.post(f"/v1/models/{handle.name}:predict", json={"instances": ["hello world", "good morning"]})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


# ----------------------------------------------------------------------------- downloads that serve
def test_s3_model_is_downloaded_and_served(s3, log_dir, tmp_path):
    dest = tmp_path / "downloads"
    handle = start_server("s3://models/bert_cls", "bert_s3", log_dir, "--enable_grpc", "false",
                          env={**s3, "HFSERVE_STORAGE_DIR": str(dest)})
    try:
        assert _predict(handle) in ([0, 0], [0, 1], [1, 0], [1, 1])
        log = handle.log()
    finally:
        assert stop_server(handle) == 0
    assert "downloading s3://models/bert_cls to " + str(dest) in log
    assert "Downloaded object bert_cls/model.safetensors" in log  # kserve-storage's progress, in hfserve's log
    assert "downloaded s3://models/bert_cls to " + str(dest) in log
    assert "Found credentials" not in log  # the clients' chatter is quieted
    # the configured download directory keeps the copy after exit
    assert (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()


def test_https_archive_is_downloaded_and_served(http_models, log_dir):
    handle = start_server(f"{http_models}/bert_cls.tar.gz", "bert_http", log_dir, "--enable_grpc", "false")
    try:
        assert len(_predict(handle)) == 2
        log = handle.log()
    finally:
        assert stop_server(handle) == 0
    assert f"downloaded {http_models}/bert_cls.tar.gz to " in log
    local = pathlib.Path(log.split(f"downloaded {http_models}/bert_cls.tar.gz to ")[1].split(":")[0])
    assert local.name.startswith("hfserve-model-")
    assert not local.exists(), "the temporary copy is removed when the server exits"


def test_zip_with_one_folder_resolves_to_that_folder(http_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HFSERVE_STORAGE_DIR", str(tmp_path))
    config = resolve(build_parser().parse_args(["--model_dir", f"{http_models}/bert_cls.zip"]))
    assert config.model.local_dir == tmp_path / "bert_cls"
    assert config.model.source == str(tmp_path / "bert_cls")
    assert config.model.task is Task.sequence_classification


def test_progress_is_logged(http_models, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hfserve.storage")
    local = storage.localize(f"{http_models}/slow/bert_cls.tar.gz", tmp_path, progress_interval=0.3)
    assert (local / "config.json").is_file()
    messages = [r.getMessage() for r in caplog.records if r.name == "hfserve.storage"]
    assert messages[0] == f"downloading {http_models}/slow/bert_cls.tar.gz to {tmp_path}"
    progress = [m for m in messages if m.endswith("/s)") and "so far" in m]
    assert len(progress) >= 2, messages
    assert messages[-1].startswith(f"downloaded {http_models}/slow/bert_cls.tar.gz to {tmp_path}: ")


def test_local_forms_are_used_in_place(models, tmp_path, monkeypatch):
    bert = models["bert_cls"]
    assert storage.localize(str(bert)) == bert
    assert storage.localize(f"file://{bert}") == bert
    monkeypatch.setenv("HFSERVE_PVC_ROOT", str(bert.parent))
    assert storage.localize(f"pvc://my-claim/{bert.name}") == bert
    config = resolve(build_parser().parse_args(["--model_dir", f"pvc://my-claim/{bert.name}"]))
    assert config.model.local_dir == bert and config.model.task is Task.sequence_classification


# ----------------------------------------------------------------------------- start-up errors: one line, exit 2
def test_unknown_scheme():
    assert_one_line_error(run_hfserve("--model_dir", "ftp://example.org/model"), "ftp://", "s3://")


def test_missing_bucket(s3):
    assert_one_line_error(run_hfserve("--model_dir", "s3://no-such-bucket/bert_cls", env=s3), "s3://no-such-bucket/bert_cls", "no-such-bucket")


def test_missing_key(s3):
    assert_one_line_error(run_hfserve("--model_dir", "s3://models/no-such-model", env=s3), "s3://models/no-such-model", "No model found")


def test_unreachable_s3_endpoint(s3):
    env = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    assert_one_line_error(run_hfserve("--model_dir", "s3://models/bert_cls", env=env), "s3://models/bert_cls", "connect")


def test_missing_http_file(http_models):
    assert_one_line_error(run_hfserve("--model_dir", f"{http_models}/nothing.tar.gz"), "nothing.tar.gz", "not found")


def test_unreachable_http_endpoint():
    pytest.importorskip("kserve_storage")
    url = f"http://127.0.0.1:{free_port()}/bert_cls.tar.gz"
    assert_one_line_error(run_hfserve("--model_dir", url), url, "connect")


def test_not_a_model(http_models, tmp_path):
    # a copy that holds no config.json, downloaded or in place
    assert_one_line_error(run_hfserve("--model_dir", f"{http_models}/readme.zip"), "readme.zip", "no config.json")
    (tmp_path / "readme.txt").write_text("no model here")
    assert_one_line_error(run_hfserve("--model_dir", f"file://{tmp_path}"), f"file://{tmp_path}", "config.json")


def test_kserve_storage_not_installed(tmp_path):
    blocker = tmp_path / "kserve_storage"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('No module named kserve_storage')\n")
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    proc = run_hfserve("--model_dir", "s3://models/bert_cls", env={"PYTHONPATH": pythonpath})
    assert_one_line_error(proc, "kserve-storage", "hfserve[storage]")


def test_missing_pvc_path(tmp_path):
    proc = run_hfserve("--model_dir", "pvc://claim/no/such/dir", env={"HFSERVE_PVC_ROOT": str(tmp_path)})
    assert_one_line_error(proc, "pvc://claim/no/such/dir", str(tmp_path / "no/such/dir"))


def test_model_id_takes_no_storage_uri():
    assert_one_line_error(run_hfserve("--model_id", "s3://models/bert_cls"), "--model_id", "--model_dir")


def test_download_dir_that_cannot_be_created(tmp_path):
    pytest.importorskip("kserve_storage")
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_hfserve("--model_dir", "s3://models/bert_cls", env={"HFSERVE_STORAGE_DIR": str(blocker / "sub")})
    assert_one_line_error(proc, "download directory")


def test_local_model_dir_does_not_import_storage_clients(models):
    # a plain local --model_dir never imports kserve-storage (nor boto3 and the other clients)
    code = (
        "import sys; from hfserve.cli import build_parser, resolve; "
        f"resolve(build_parser().parse_args(['--model_dir', {str(models['bert_cls'])!r}])); "
        "print('kserve_storage' in sys.modules, 'boto3' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False", out.stderr
