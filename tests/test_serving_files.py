"""The files in serving/ and what serving/README.md shows: pinned image, loopback ports, configs the server
parses, the TLS variant, the README's examples and its `saved_model_cli` output, as written."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import stat
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from tensorflow_serving.config import model_server_config_pb2

from microsr_tf.export import export_saved_model
from microsr_tf.serving import messages
from serving_fixture import LoopbackServer, save_tiny_generator  # tests/serving_fixture.py

ROOT = Path(__file__).resolve().parents[1]
SERVING = ROOT / "serving"
README = (SERVING / "README.md").read_text()


def test_every_file_naming_the_server_image_pins_the_runtime_of_the_export():
    major_minor = ".".join(tf.__version__.split(".")[:2])
    named = {}
    for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *SERVING.iterdir()]:
        if path.is_file():
            for tag in re.findall(r"tensorflow/serving:([\w.\-]+)", path.read_text()):
                named.setdefault(tag, []).append(path.name)
    assert set(named) == {f"{major_minor}.0"}, named
    assert {"docker-compose.yml", "README.md"} <= set(named[f"{major_minor}.0"])


def _tls_variant(compose_text: str) -> dict:
    """The commented TLS variant at the end of docker-compose.yml, uncommented."""
    start = compose_text.index("# services:")
    return yaml.safe_load("\n".join(line.removeprefix("# ").removeprefix("#")
                                    for line in compose_text[start:].splitlines()))


def test_compose_publishes_on_loopback_only_and_its_tls_variant_is_complete():
    text = (SERVING / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    server = compose["services"]["tfserving"]
    assert server["image"] == "tensorflow/serving:2.21.0"
    assert sorted(server["ports"]) == ["127.0.0.1:8500:8500", "127.0.0.1:8501:8501"]
    for volume in server["volumes"][1:]:  # ./models is where `microsr-tf export` writes
        assert (SERVING / volume.split(":")[0]).is_file(), volume
    tls = _tls_variant(text)["services"]
    assert "--ssl_config_file=/tls/ssl_config.txt" in tls["tfserving"]["command"]
    assert tls["tfserving"]["ports"] == ["8500:8500"]  # the plain REST port is not published
    assert tls["rest-proxy"]["ports"] == ["8443:8443"]
    conf = next(v for v in tls["rest-proxy"]["volumes"] if v.startswith("./nginx"))
    nginx = (SERVING / conf.split(":")[0].removeprefix("./")).read_text()
    assert "proxy_pass http://tfserving:8501;" in nginx and "listen 8443 ssl;" in nginx
    assert "if ($microsr_token_ok = 0)" in nginx and "include /tls/token.map;" in nginx


def test_models_config_parses_as_the_server_reads_it():
    config = text_format.Parse((SERVING / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("microsr", "/models/microsr", "tensorflow")


def _message(name: str, fields: list[tuple[str, int, int, str | None]], deps=()):
    """A protobuf message class built from field (name, number, type, type_name) rows, as in TF-Serving's .proto."""
    pool = descriptor_pool.DescriptorPool()
    for dep in deps:
        file_proto = descriptor_pb2.FileDescriptorProto()
        dep.CopyToProto(file_proto)
        pool.Add(file_proto)
    file_proto = descriptor_pb2.FileDescriptorProto(name=f"{name}.proto", package="tensorflow.serving",
                                                    syntax="proto3", dependency=[d.name for d in deps])
    msg = file_proto.message_type.add(name=name)
    for field, number, kind, type_name in fields:
        label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED if field == "allowed_batch_sizes" else \
            descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
        msg.field.add(name=field, number=number, type=kind, label=label, **({"type_name": type_name} if type_name else {}))
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))


def test_batching_parameters_parse_as_tf_serving_batching_parameters():
    from google.protobuf import wrappers_pb2

    t = descriptor_pb2.FieldDescriptorProto
    int64, boolean = ".google.protobuf.Int64Value", ".google.protobuf.BoolValue"
    batching = _message("BatchingParameters", [
        ("max_batch_size", 1, t.TYPE_MESSAGE, int64), ("batch_timeout_micros", 2, t.TYPE_MESSAGE, int64),
        ("max_enqueued_batches", 3, t.TYPE_MESSAGE, int64), ("num_batch_threads", 4, t.TYPE_MESSAGE, int64),
        ("thread_pool_name", 5, t.TYPE_MESSAGE, ".google.protobuf.StringValue"),
        ("allowed_batch_sizes", 6, t.TYPE_INT64, None), ("pad_variable_length_inputs", 7, t.TYPE_BOOL, None),
        ("enable_large_batch_splitting", 8, t.TYPE_MESSAGE, boolean),
        ("max_execution_batch_size", 9, t.TYPE_MESSAGE, int64)], deps=[wrappers_pb2.DESCRIPTOR])
    params = text_format.Parse((SERVING / "batching_parameters.txt").read_text(), batching())
    assert params.max_batch_size.value * 1024 * 1024 <= 4096 * 4096  # within the export's default --max-pixels
    assert params.num_batch_threads.value >= 1 and not params.pad_variable_length_inputs


def test_every_request_the_client_builds_has_a_batch_dimension():
    """What TF-Serving's batcher needs: every input with a first dimension, equal across the inputs."""
    x = np.zeros((3, 8, 8, 1), np.float32)
    for request in (messages.hr_grid_request(x), messages.hr_grid_request(x, 2, 5),
                    messages.hr_grid_request(x, 2, [1, 2, 3]), messages.scanner_request(x, [0.4, 0.4], 2, 5),
                    messages.metadata_request()):
        firsts = {np.asarray(v).shape[0] if np.ndim(v) else None for v in request.inputs.values()}
        assert len(firsts) == 1 and None not in firsts, request.signature


def test_make_ssl_config_writes_the_sslconfig_tf_serving_reads(tmp_path):
    t = descriptor_pb2.FieldDescriptorProto
    ssl_config_cls = _message("SSLConfig", [("server_key", 1, t.TYPE_STRING, None),
                                            ("server_cert", 2, t.TYPE_STRING, None),
                                            ("custom_ca", 3, t.TYPE_STRING, None),
                                            ("client_verify", 4, t.TYPE_BOOL, None)])
    spec = importlib.util.spec_from_file_location("make_ssl_config", SERVING / "make_ssl_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    key = '-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG"\\+/=\n-----END PRIVATE KEY-----\n'
    cert, ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "CA PEM\n"
    for client_ca in (None, ca):
        parsed = text_format.Parse(module.ssl_config(key, cert, client_ca), ssl_config_cls())
        assert (parsed.server_key, parsed.server_cert) == (key, cert)
        assert (parsed.custom_ca, parsed.client_verify) == ((ca, True) if client_ca else ("", False))
    for name, text in (("k", key), ("c", cert)):
        (tmp_path / name).write_text(text)
    import subprocess
    import sys

    subprocess.run([sys.executable, str(SERVING / "make_ssl_config.py"), "--key", str(tmp_path / "k"), "--cert",
                    str(tmp_path / "c"), "--out", str(tmp_path / "ssl.txt")], check=True)
    assert text_format.Parse((tmp_path / "ssl.txt").read_text(), ssl_config_cls()).server_key == key
    assert stat.S_IMODE((tmp_path / "ssl.txt").stat().st_mode) == 0o600  # it holds the private key


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("files")
    save_tiny_generator(tmp / "g.keras")
    return export_saved_model(tmp / "g.keras", tmp / "models" / "microsr", samples=100)


def test_the_readme_curl_examples_work_as_written(export):
    lines = [line for line in README.splitlines() if line.startswith("curl ")]
    assert len(lines) == 2
    with LoopbackServer(export.parent) as server:
        for line in lines:
            url = re.search(r"(http://127\.0\.0\.1:8501\S+)", line).group(1)
            body = re.search(r"-d '(.*)'$", line).group(1)
            request = urllib.request.Request(url.replace("127.0.0.1:8501", server.rest_target), data=body.encode(),
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    outputs = json.loads(response.read())["outputs"]
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"{line}: HTTP {exc.code} {exc.read()!r}") from None
            if "metadata" in body:
                assert json.loads(outputs[0])["hr_spacing"] == [0.1, 0.1]
            else:
                assert np.asarray(outputs["mean"]).shape == (1, 8, 8, 1) and np.min(outputs["variance"]) >= 0


def test_the_readme_shows_what_saved_model_cli_prints_for_an_export(export):
    from tensorflow.python.tools import saved_model_cli

    shown = README.split("```text\n")[-1].split("```")[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        saved_model_cli._show_all(str(export))
    # the op list is printed from a Python set, in an order that changes between runs
    strip_ops = lambda text: re.sub(r"contains the following ops: \{.*\}", "", text).strip()  # noqa: E731
    assert strip_ops(shown) == strip_ops(printed.getvalue())
    ops = lambda text: set(re.findall(r"'(\w+)'", re.search(r"ops: \{(.*)\}", text).group(1)))  # noqa: E731
    assert ops(shown) == ops(printed.getvalue())


def test_the_readme_client_example_is_the_file():
    block = README.split("```python\n")[1].split("```")[0]
    assert block == (SERVING / "client_example.py").read_text()
