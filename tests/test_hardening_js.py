"""Issue 16 item 9: a JavaScript (Node.js, @grpc/grpc-js) client that knows the API only through server
reflection passes typed options, generates, streams and decodes samples against a real server.

The npm packages are installed once into a cache folder ($DIFFSERVE_JS_CACHE, default
~/.cache/diffserve/js-client) from tests/js/package.json.  Without node or npm the test is skipped, unless
DIFFSERVE_REQUIRE_SERVICES is set (CI), where it fails."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.client import tensor_to_array
from tests.server_fixtures import gmm_model, pb, running_server, stub_for

JS = Path(__file__).resolve().parent / "js"
CACHE = Path(os.environ.get("DIFFSERVE_JS_CACHE", Path.home() / ".cache" / "diffserve" / "js-client"))


def unavailable(why: str):
    if os.environ.get("DIFFSERVE_REQUIRE_SERVICES"):
        pytest.fail(f"{why} but DIFFSERVE_REQUIRE_SERVICES is set")
    pytest.skip(why)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        unavailable("node and npm are needed for the JavaScript client test (apt-get install nodejs npm)")
    wanted = (JS / "package.json").read_text()
    CACHE.mkdir(parents=True, exist_ok=True)
    installed = CACHE / "package.json"
    if not (CACHE / "node_modules" / "grpc-js-reflection-client").is_dir() or \
            not installed.exists() or installed.read_text() != wanted:
        installed.write_text(wanted)
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent"], cwd=CACHE,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            installed.unlink()
            unavailable(f"npm install failed: {done.stderr.strip()[-300:]}")
    return CACHE / "node_modules"


def test_a_javascript_client_through_reflection(node_modules):
    with running_server({"gmm": gmm_model()}) as srv:
        address = f"127.0.0.1:{srv.port}"
        done = subprocess.run(["node", str(JS / "client.js"), address], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NODE_PATH": str(node_modules)})
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        stub, channel = stub_for(srv)
        request = pb.GenerateRequest(model="gmm", sampler="ddim", steps=3, num_samples=2, format=pb.TENSOR)
        request.options.update({"eta": 0.5})
        python = stub.Generate(request)
        channel.close()
    assert {"diffserve.v1.Diffserve", "grpc.reflection.v1.ServerReflection"} <= set(seen["services"])
    assert seen["models"] == [{"name": "gmm", "layout": "CHW", "value_min": -1, "value_max": 1}]
    assert seen["seeds"] == ["0", "1"] and seen["stream_seeds"] == ["0", "1"]  # seed 0 is present
    for js, sample in zip(seen["samples"], python.samples):
        expected = tensor_to_array(sample.tensor)
        assert js["dtype"] == "float32" and js["shape"] == list(expected.shape)
        np.testing.assert_array_equal(np.asarray(js["values"], dtype=np.float32), expected.ravel())
    assert seen["progress"] == 3 and seen["png_signature"] == "PNG"
    assert seen["refused"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert seen["refused"]["details"].startswith("typed_options.eta: nan is not a finite number")
