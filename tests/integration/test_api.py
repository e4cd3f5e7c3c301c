"""The online API over real HTTP and real gRPC on localhost, in front of real tiny replicas on the shared Ray.

One app for the module (`ApiIngress` + one `StackReplica`), deployed once; a second app whose replica can never
be placed shows 503 while not ready. Images are compared with the same batch runner in this process.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from factory.routing.auth import new_key
from factory.routing.proxy_bound import proxy_environment
from tests.s3server import new_bucket

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TENANTS = REPO / "jobs" / "tenants.yaml"
APP = "api-test"
NOT_READY_APP = "api-notready"
KEYS = {tenant: new_key(tenant) for tenant in ("acme", "globex", "initech", "umbrella")}
MAX_IMAGE_BYTES = 300_000
GEN = {"steps": 2, "width": 64, "height": 64}  # quick generations
SLOW = {"steps": 4, "width": 256, "height": 256}  # ~0.4 s alone, ~1.7 s in a batch of 4, on this machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tenants_with_inputs(bucket: str, folder: Path) -> Path:
    """jobs/tenants.yaml, each tenant confined to its own uploads (umbrella's registry also names private/, which
    the server's input_prefixes narrow away)."""
    import yaml

    data = yaml.safe_load(TENANTS.read_text())
    for name, tenant in data["tenants"].items():
        for adapter in tenant.get("adapters", {}).values():
            adapter["uri"] = str(TENANTS.parent / adapter["uri"])  # the same files: the same replica fingerprint
        tenant["inputs"] = [f"{bucket}/inputs/{name}/"] + ([f"{bucket}/private/"] if name == "umbrella" else [])
    path = folder / "tenants.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def serving_config(bucket: str, http_port: int, grpc_port: int, tenants: Path = TENANTS, **serve) -> dict:
    return {
        "app_name": APP, "profile": "tiny", "tenants": str(tenants),
        "serve": {"replicas": 1, "num_cpus": 1, "max_batch_size": 4, "batch_wait_timeout_s": 0.01,
                  "max_ongoing_requests": 4, "max_queued_requests": 8, **serve},
        # Per-tenant prompt lists come with the tenant: acme's word is blocked for acme only.
        "safety": {"prompt_terms": ["forbiddenword"], "tenant_terms": {"acme": ["competitorname"]}},
        "api": {
            "keys": [made.entry.model_dump() for made in KEYS.values()],
            "max_in_flight": 6, "tenant_max_in_flight": {"initech": 1, "umbrella": 64},
            "input_prefixes": [f"{bucket}/inputs/"], "output_prefix": f"{bucket}/out",
            "limits": {"max_side": 256, "max_steps": 4, "max_image_bytes": MAX_IMAGE_BYTES},
            "defaults": GEN, "request_timeout_s": 60,
            "http": {"port": http_port}, "grpc": {"enabled": True, "all_interfaces": True, "port": grpc_port},
        },
    }


def png(size=(48, 40), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(poll)


@pytest.fixture(scope="module")
def served(ray_cluster, s3_endpoint, tmp_path_factory):
    from ray import serve

    from factory.io.storage import Storage
    from factory.jobs.cluster.serve_app import wait_until_ready
    from factory.routing.app import deploy_serving, load_serving

    bucket = new_bucket(s3_endpoint, "api")
    for tenant in ("acme", "globex"):
        Storage().write_bytes(f"{bucket}/inputs/{tenant}/coffee.png", png((64, 48), (90, 60, 20)))
    Storage().write_bytes(f"{bucket}/inputs/globex/upload.png", png((32, 32), (10, 200, 10)))
    Storage().write_bytes(f"{bucket}/inputs/acme-evil/x.png", png())
    Storage().write_bytes(f"{bucket}/inputs/umbrella/u.png", png())
    Storage().write_bytes(f"{bucket}/private/secret.png", png())
    registry = tenants_with_inputs(bucket, tmp_path_factory.mktemp("api-tenants"))
    # Serve's proxies keep the ports they started with: an earlier module's Serve (HTTP only, port 8000) is
    # replaced by one with this module's HTTP and gRPC ports (its apps were deleted with their modules).
    serve.shutdown()
    http_port, grpc_port = _free_port(), _free_port()
    serving = load_serving(serving_config(bucket, http_port, grpc_port, tenants=registry))
    deploy_serving(serving)
    wait_until_ready(APP, 180)
    base = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: requests.get(f"{base}/readyz", timeout=10).status_code == 200, 60)
    yield {"base": base, "grpc": f"127.0.0.1:{grpc_port}", "bucket": bucket, "serving": serving}
    for name in (APP, NOT_READY_APP):
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001
            pass


def key_header(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant].key}"}


def post(served, path: str, body: dict, tenant: str | None = "acme", key: str | None = None, timeout=60):
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    elif tenant is not None:
        headers["Authorization"] = f"Bearer {KEYS[tenant].key}"
    return requests.post(f"{served['base']}{path}", json=body, headers=headers, timeout=timeout)


def post_honouring_retry_after(served, path: str, body: dict, tenant: str, attempts: int = 20):
    """A well-behaved client: Serve's router counts a request as queued until it is assigned, so a burst larger
    than max_queued_requests can be shed (503 + Retry-After) even while the replica has free slots."""
    for _ in range(attempts):
        response = post(served, path, body, tenant=tenant)
        if response.status_code != 503 or response.json().get("code") != "overloaded":
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def decoded(body: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(body["image_base64"])))


def assert_error(response, status: int, field: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["message"] and "Traceback" not in response.text
    if field is not None:
        assert body["field"] == field, body
    return body


# ---- each task, both doors ------------------------------------------------------------------------------------


def test_health_ready_and_openapi(served):
    assert requests.get(f"{served['base']}/healthz", timeout=10).json() == {"status": "ok", "message": None}
    assert requests.get(f"{served['base']}/readyz", timeout=10).json()["status"] == "ready"
    schema = requests.get(f"{served['base']}/openapi.json", headers=key_header("acme"), timeout=10).json()
    assert {"/v1/tasks", "/v1/generate", "/v1/caption", "/v1/answer", "/healthz", "/readyz"} <= set(schema["paths"])
    assert "GenerateBody" in schema["components"]["schemas"]
    assert requests.get(f"{served['base']}/docs", headers=key_header("acme"), timeout=10).status_code == 200


def test_generate_with_the_tenants_adapter_and_seed(served):
    body = post(served, "/v1/generate", {"prompt": "a red bicycle", "seed": 7, "id": "g1"}).json()
    assert body["status"] == "ok" and body["task"] == "generate" and body["tenant"] == "acme"
    assert body["adapter"] == "acme/brand" and len(body["adapter_sha256"]) == 64  # the tenant's default
    assert (body["seed"], body["width"], body["height"], body["steps"]) == (7, 64, 64, 2)
    assert decoded(body).size == (64, 64)
    again = post(served, "/v1/generate", {"prompt": "a red bicycle", "seed": 7, "id": "g2"}).json()
    assert again["image_base64"] == body["image_base64"]  # same seed, same bytes
    eu = post(served, "/v1/generate", {"prompt": "a red bicycle", "seed": 7, "region": "eu"}).json()
    assert eu["adapter"] == "acme/eu-minimal" and eu["image_base64"] != body["image_base64"]
    base = post(served, "/v1/generate", {"prompt": "a red bicycle", "seed": 7, "adapter": "base"}).json()
    assert "adapter" not in base
    qualified = post(served, "/v1/generate", {"prompt": "x", "seed": 1, "adapter": "acme/na-contrast"}).json()
    assert qualified["adapter"] == "acme/na-contrast"


def test_caption_and_answer_from_base64_and_s3(served):
    caption = post(served, "/v1/caption", {"image_base64": b64(png()), "prompt": "one line"}).json()
    assert caption["status"] == "ok" and caption["task"] == "caption" and caption["caption"]
    assert "image_base64" not in caption
    answer = post(served, "/v1/answer", {"image_uri": f"{served['bucket']}/inputs/acme/coffee.png",
                                         "question": "How many cups?"}).json()
    assert answer["task"] == "vqa" and answer["answer"] and answer["question"] == "How many cups?"


def test_the_task_parser_decides_at_the_door(served):
    image = b64(png())
    question = post(served, "/v1/tasks", {"prompt": "Question: what colour?", "image_base64": image}).json()
    assert question["task"] == "vqa" and question["question"] == "what colour?" and question["answer"]
    describe = post(served, "/v1/tasks", {"prompt": "Describe: briefly", "image_base64": image}).json()
    assert describe["task"] == "caption" and describe["caption"]
    generate = post(served, "/v1/tasks", {"prompt": "summer sale poster", "seed": 3}).json()
    assert generate["task"] == "generate" and decoded(generate).size == (64, 64)
    explicit = post(served, "/v1/tasks", {"task": "describe", "image_base64": image}).json()
    assert explicit["task"] == "caption"


def test_output_to_a_key_under_the_output_prefix(served):
    from factory.io.storage import Storage

    body = post(served, "/v1/generate", {"prompt": "stored", "seed": 5, "id": "sku/12", "output": "uri"}).json()
    assert body["image_uri"] == f"{served['bucket']}/out/images/acme/sku%2F12.png"
    assert "image_base64" not in body
    stored = Storage().read_bytes(body["image_uri"])
    assert Image.open(io.BytesIO(stored)).size == (64, 64)


def test_safety_blocks_with_200_and_no_image_per_tenant_lists(served):
    blocked = post(served, "/v1/generate", {"prompt": "a forbiddenword poster"})
    assert blocked.status_code == 200
    body = blocked.json()
    assert body["status"] == "blocked" and "image_base64" not in body and "image_uri" not in body
    assert body["safety"]["decided_by"] == "prompt_filter"
    # acme's own list: blocked for acme, not for globex
    assert post(served, "/v1/generate", {"prompt": "competitorname shoes"}).json()["status"] == "blocked"
    assert post(served, "/v1/generate", {"prompt": "competitorname shoes"}, tenant="globex").json()["status"] == "ok"


def test_grpc_each_method_and_its_errors(served):
    import grpc

    from factory.routing.proto import factory_api_pb2 as pb
    from factory.routing.proto import factory_api_pb2_grpc as pb_grpc

    metadata = (("application", APP), ("authorization", f"Bearer {KEYS['globex'].key}"))
    with grpc.insecure_channel(served["grpc"]) as channel:
        stub = pb_grpc.FactoryStub(channel)
        assert stub.Ready(pb.ReadyRequest(), metadata=metadata, timeout=30).ready
        generated = stub.Generate(pb.TaskRequest(prompt="a red bicycle", seed=7, id="grpc-1"), metadata=metadata,
                                  timeout=60)
        assert generated.status == "ok" and generated.adapter == "globex/brand" and generated.seed == 7
        assert Image.open(io.BytesIO(generated.image)).size == (64, 64)
        over_http = post(served, "/v1/generate", {"prompt": "a red bicycle", "seed": 7, "id": "grpc-1"},
                         tenant="globex").json()
        assert base64.b64decode(over_http["image_base64"]) == generated.image  # one door or the other
        caption = stub.Caption(pb.TaskRequest(image=png()), metadata=metadata, timeout=60)
        assert caption.task == "caption" and caption.caption and caption.safety.verdict == "pass"
        answer = stub.Answer(pb.TaskRequest(image_uri=f"{served['bucket']}/inputs/globex/coffee.png", question="Cups?"),
                             metadata=metadata, timeout=60)
        assert answer.task == "vqa" and answer.answer
        routed = stub.Task(pb.TaskRequest(prompt="Question: what is it?", image=png()), metadata=metadata, timeout=60)
        assert routed.task == "vqa"

        def code_of(call, message, meta=metadata):
            with pytest.raises(grpc.RpcError) as caught:
                call(message, metadata=meta, timeout=60)
            error = caught.value
            details = json.loads(error.details())
            assert "Traceback" not in error.details()
            return error.code(), details, dict(error.trailing_metadata() or ())

        code, details, trailing = code_of(stub.Generate, pb.TaskRequest(prompt="x", width=100))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field"] == "width"
        assert trailing["http-status"] == "422"
        code, details, _ = code_of(stub.Generate, pb.TaskRequest(prompt="x", image=png()))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field"] == "image"
        code, details, _ = code_of(stub.Generate, pb.TaskRequest(prompt="x", adapter="nope"))
        assert code == grpc.StatusCode.NOT_FOUND and details["field"] == "adapter"
        code, _, _ = code_of(stub.Generate, pb.TaskRequest(prompt="x", adapter="acme/brand"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _, _ = code_of(stub.Caption, pb.TaskRequest(image=b"\0" * (MAX_IMAGE_BYTES + 1)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, details, trailing = code_of(stub.Generate, pb.TaskRequest(prompt="x"),
                                          (("application", APP), ("authorization", "Bearer fk_nope")))
        assert code == grpc.StatusCode.UNAUTHENTICATED and trailing["http-status"] == "401"


# ---- edits, both doors -----------------------------------------------------------------------------------------


def test_edit_over_http_and_grpc_reads_its_reference_under_the_tenants_roots(served):
    """`POST /v1/edit` and gRPC `Edit`: the same reference and seed give the same bytes whichever way the reference
    comes (an s3:// URI, base64, raw gRPC bytes); another reference gives another image; a reference outside the
    tenant's roots is 403 before any read; the profile's one-reference limit is 400 naming `images`."""
    import hashlib

    import grpc

    from factory.io.storage import Storage
    from factory.routing.proto import factory_api_pb2 as pb
    from factory.routing.proto import factory_api_pb2_grpc as pb_grpc

    bucket = served["bucket"]
    own = f"{bucket}/inputs/globex/coffee.png"
    packshot = Storage().read_bytes(own)
    body = {"prompt": "place the product on a beach", "seed": 7}
    by_uri = post(served, "/v1/edit", {**body, "image_uri": own}, tenant="globex").json()
    assert by_uri["status"] == "ok" and by_uri["task"] == "edit" and by_uri["adapter"] == "globex/brand"
    assert by_uri["reference_sha256"] == [hashlib.sha256(packshot).hexdigest()]
    # no size: the reference's 4:3 within the server's default 64x64 pixels
    assert decoded(by_uri).size == (by_uri["width"], by_uri["height"]) == (80, 48)
    by_upload = post(served, "/v1/edit", {**body, "image_base64": b64(packshot)}, tenant="globex").json()
    assert by_upload["image_base64"] == by_uri["image_base64"]
    routed = post(served, "/v1/tasks", {**body, "prompt": "Edit: place the product on a beach", "image_uri": own},
                  tenant="globex").json()
    assert routed["task"] == "edit" and routed["image_base64"] == by_uri["image_base64"]
    other = post(served, "/v1/edit", {**body, "images": [{"image_base64": b64(png((64, 48), (10, 200, 10)))}]},
                 tenant="globex").json()
    assert other["status"] == "ok" and other["image_base64"] != by_uri["image_base64"]

    assert_error(post(served, "/v1/edit", {**body, "image_uri": f"{bucket}/inputs/acme/coffee.png"},
                      tenant="globex"), 403, "image_uri")
    refused = assert_error(post(served, "/v1/edit", {**body, "images": [{"image_uri": f"{bucket}/private/secret.png"}]},
                                tenant="globex"), 403, "images[0]")
    assert "outside the inputs of tenant globex" in refused["message"]
    two = [{"image_uri": own}, {"image_base64": b64(packshot)}]
    assert "profile tiny takes at most 1" in assert_error(
        post(served, "/v1/edit", {**body, "images": two}, tenant="globex"), 400, "images")["message"]
    assert_error(post(served, "/v1/edit", {**body, "image_base64": b64(b"\0" * (MAX_IMAGE_BYTES + 10))},
                      tenant="globex"), 413, "image_base64")
    assert_error(post(served, "/v1/edit", {"prompt": "x"}, tenant="globex"), 400, "image")

    metadata = (("application", APP), ("authorization", f"Bearer {KEYS['globex'].key}"))
    with grpc.insecure_channel(served["grpc"]) as channel:
        stub = pb_grpc.FactoryStub(channel)
        for message in (pb.TaskRequest(prompt=body["prompt"], seed=7, image_uri=own),
                        pb.TaskRequest(prompt=body["prompt"], seed=7, image=packshot),
                        pb.TaskRequest(prompt=body["prompt"], seed=7, images=[pb.Reference(image=packshot)])):
            edited = stub.Edit(message, metadata=metadata, timeout=60)
            assert edited.task == "edit" and edited.status == "ok"
            assert edited.image == base64.b64decode(by_uri["image_base64"])
            assert list(edited.reference_sha256) == by_uri["reference_sha256"]
        for message, field in ((pb.TaskRequest(prompt="x", image_uri=f"{bucket}/inputs/acme-evil/x.png"), "image_uri"),
                               (pb.TaskRequest(prompt="x", images=[pb.Reference(image_uri=f"{bucket}/private/secret.png")]),
                                "images[0]")):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Edit(message, metadata=metadata, timeout=60)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert json.loads(caught.value.details())["field"] == field


# ---- errors ----------------------------------------------------------------------------------------------------


def test_bad_input_is_400_or_422_naming_the_field(served):
    assert_error(post(served, "/v1/generate", {"prompt": "x", "colour": "red"}), 422, "colour")
    assert_error(post(served, "/v1/generate", {"prompt": "x", "width": 100}), 422, "width")
    assert_error(post(served, "/v1/generate", {"seed": 1}), 422, "prompt")
    assert_error(post(served, "/v1/generate", {"prompt": "x", "width": 512}), 400, "width")  # over the server's cap
    assert_error(post(served, "/v1/tasks", {"task": "paint", "prompt": "x"}), 400, "task")
    assert_error(post(served, "/v1/tasks", {"prompt": "Question: what?"}), 400, "image")
    assert_error(post(served, "/v1/caption", {"image_base64": "not base64!"}), 422, "image_base64")
    assert_error(post(served, "/v1/caption", {"image_base64": b64(b"hello, not an image")}), 400, "image_base64")
    assert_error(post(served, "/v1/answer", {"image_uri": "/etc/passwd", "question": "?"}), 400, "image_uri")
    assert_error(post(served, "/v1/answer", {"image_uri": f"{served['bucket']}/inputs/acme/missing.png",
                                             "question": "?"}), 400, "image_uri")
    raw = requests.post(f"{served['base']}/v1/generate", data=b"{not json",
                        headers={"Authorization": f"Bearer {KEYS['acme'].key}", "Content-Type": "application/json"},
                        timeout=30)
    assert_error(raw, 400, "body")
    assert_error(requests.get(f"{served['base']}/v1/nothing-here", headers=key_header("acme"), timeout=10), 404)


def test_401_403_404(served):
    missing = post(served, "/v1/generate", {"prompt": "x"}, tenant=None)
    assert_error(missing, 401)
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert_error(post(served, "/v1/generate", {"prompt": "x"}, key="fk_000000000000_" + "0" * 64), 401)
    forged = KEYS["acme"].key[:-1] + ("0" if KEYS["acme"].key[-1] != "0" else "1")
    assert_error(post(served, "/v1/generate", {"prompt": "x"}, key=forged), 401)
    # another tenant's adapter, even one that exists; and inputs outside the allowed prefixes
    assert_error(post(served, "/v1/generate", {"prompt": "x", "adapter": "globex/brand"}), 403, "adapter")
    assert_error(post(served, "/v1/answer", {"image_uri": f"{served['bucket']}/private/secret.png",
                                             "question": "?"}), 403, "image_uri")
    assert_error(post(served, "/v1/answer", {"image_uri": f"{served['bucket']}/inputs/../private/secret.png",
                                             "question": "?"}), 403, "image_uri")
    # an adapter name the tenant does not have (globex has apac-bold; acme does not)
    assert_error(post(served, "/v1/generate", {"prompt": "x", "adapter": "apac-bold"}), 404, "adapter")
    assert_error(post(served, "/v1/generate", {"prompt": "x", "adapter": "eu-minimal"}, tenant="initech"), 404,
                 "adapter")


def test_a_key_reads_only_its_tenants_inputs_over_http_and_grpc(served):
    """The tenant's registry `inputs`, narrowed by the server's input_prefixes, judged by the same rule as batch
    rows: another tenant's upload, '..' (literal or percent-encoded) and a look-alike prefix are 403 before any
    read, over both doors."""
    import grpc

    from factory.routing.proto import factory_api_pb2 as pb
    from factory.routing.proto import factory_api_pb2_grpc as pb_grpc

    bucket = served["bucket"]
    upload = f"{bucket}/inputs/globex/upload.png"
    assert post(served, "/v1/answer", {"image_uri": upload, "question": "?"}, tenant="globex").status_code == 200
    for uri in (upload, f"{bucket}/inputs/acme/%2e%2e/globex/upload.png", f"{bucket}/inputs/acme/../globex/upload.png",
                f"{bucket}/inputs/acme/%2E%2e%2fglobex%2fupload.png", f"{bucket}/inputs/acme-evil/x.png",
                f"{bucket}/private/secret.png"):
        body = assert_error(post(served, "/v1/answer", {"image_uri": uri, "question": "?"}), 403, "image_uri")
        assert body["message"].startswith(f"image_uri: {uri}") and "is outside the inputs of tenant acme" in body[
            "message"] and body["message"].endswith(f"(allowed: {bucket}/inputs/acme/)")  # acme's own roots only
    # umbrella's registry names private/ too; the server's input_prefixes narrow it away
    assert_error(post(served, "/v1/answer", {"image_uri": f"{bucket}/private/secret.png", "question": "?"},
                      tenant="umbrella"), 403, "image_uri")
    assert post(served, "/v1/caption", {"image_uri": f"{bucket}/inputs/umbrella/u.png"},
                tenant="umbrella").status_code == 200

    metadata = (("application", APP), ("authorization", f"Bearer {KEYS['acme'].key}"))
    with grpc.insecure_channel(served["grpc"]) as channel:
        stub = pb_grpc.FactoryStub(channel)
        own = stub.Answer(pb.TaskRequest(image_uri=f"{bucket}/inputs/acme/coffee.png", question="Cups?"),
                          metadata=metadata, timeout=60)
        assert own.answer
        for uri in (upload, f"{bucket}/inputs/acme/%2e%2e/globex/upload.png", f"{bucket}/inputs/acme-evil/x.png"):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Answer(pb.TaskRequest(image_uri=uri, question="?"), metadata=metadata, timeout=60)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            details = json.loads(caught.value.details())
            assert details["field"] == "image_uri" and "outside the inputs of tenant acme" in details["message"]


def test_413_for_oversized_images(served):
    big = b"\0" * (MAX_IMAGE_BYTES + 10)
    assert_error(post(served, "/v1/caption", {"image_base64": b64(big)}), 413, "image_base64")
    # a small file that claims too many pixels (checked on the header, before decoding)
    bomb = io.BytesIO()
    Image.new("1", (9000, 5000)).save(bomb, "PNG")
    assert_error(post(served, "/v1/caption", {"image_base64": b64(bomb.getvalue())}), 413, "image_base64")
    from factory.io.storage import Storage

    Storage().write_bytes(f"{served['bucket']}/inputs/acme/big.bin", big)
    assert_error(post(served, "/v1/answer", {"image_uri": f"{served['bucket']}/inputs/acme/big.bin",
                                             "question": "?"}), 413, "image_uri")


def test_429_past_the_tenants_in_flight_bound(served):
    # initech may have one request in flight: four at once, the others are refused at the door
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: post(served, "/v1/generate", {"prompt": f"slow {i}", **SLOW},
                                                 tenant="initech"), range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert_error(refused, 429)
    assert refused.headers["Retry-After"] == "1"
    # other tenants are not held back by initech's bound
    assert post(served, "/v1/generate", {"prompt": "x"}, tenant="globex").status_code == 200


def test_503_when_serve_sheds_load(served):
    # 4 ongoing + 8 queued per ingress handle; the rest is shed by Serve (BackPressureError) -> 503, not 500
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda i: post(served, "/v1/generate", {"prompt": f"load {i}", **SLOW},
                                                 tenant="umbrella", timeout=120), range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
    shed = next(r for r in responses if r.status_code == 503)
    assert assert_error(shed, 503)["code"] == "overloaded" and shed.headers["Retry-After"] == "1"


def test_503_while_no_replica_is_ready(served):
    from ray import serve

    from factory.routing.app import deploy_serving, load_serving

    config = serving_config(served["bucket"], 1, 1, num_cpus=64)  # a replica this cluster can never place
    config["app_name"] = NOT_READY_APP
    config["api"]["ready_probe_timeout_s"] = 0.5
    deploy_serving(load_serving(config), route_prefix="/notready")
    base = f"{served['base']}/notready"
    wait_for(lambda: requests.get(f"{base}/healthz", timeout=10).status_code == 200, 60)
    not_ready = requests.get(f"{base}/readyz", timeout=10)
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "not_ready"
    refused = requests.post(f"{base}/v1/generate", json={"prompt": "x"}, timeout=30,
                            headers={"Authorization": f"Bearer {KEYS['acme'].key}"})
    assert assert_error(refused, 503)["code"] == "not_ready" and refused.headers["Retry-After"] == "1"
    serve.delete(NOT_READY_APP)


# ---- the door: keys before bodies, bodies bounded before they are read --------------------------------------

GIB = 1 << 30
# What Serve's proxy and the ingress replica may grow by while a 1 GiB body is refused. The proxy reads no further
# into a body than the limit (factory.routing.proxy_bound): the rest waits in the client's socket until the answer
# goes out. Measured with it: ~1 MiB each. Without it, both read ahead until the answer went out, so they held
# what arrived meanwhile: ~30 MiB on a quiet machine, ~150 MiB with the two cores busy (a 64 MB body had grown
# them by up to 350 MB before the gate).
RSS_BOUND = 32 * 1024**2
GIVE_UP = 256 * 1024**2


def _serve_pids(dashboard: str) -> dict[str, int]:
    """The processes of Serve's proxy and of this app's ingress replica, as Ray's state API reports them."""
    from ray.util.state import list_actors

    pids = {}
    for actor in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name == "ProxyActor":
            pids["proxy"] = actor.pid
        elif actor.class_name == f"ServeReplica:{APP}:ApiIngress":
            pids["ingress"] = actor.pid
    assert set(pids) == {"proxy", "ingress"}, pids
    return pids


class PeakGrowth:
    """The largest RSS growth of each process while the block runs, sampled every few milliseconds."""

    def __init__(self, pids: dict[str, int]) -> None:
        import psutil

        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.base = {name: process.memory_info().rss for name, process in self.processes.items()}
        self.peak = dict(self.base)
        self.running = True

    def sample(self) -> None:
        while self.running:
            for name, process in self.processes.items():
                self.peak[name] = max(self.peak[name], process.memory_info().rss)
            time.sleep(0.003)

    def __enter__(self) -> PeakGrowth:
        import threading

        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)  # what the servers still hold just after answering
        self.running = False
        self.thread.join()

    def growth(self) -> dict[str, int]:
        return {name: self.peak[name] - self.base[name] for name in self.processes}


def stream_body(served, path: str, *, total: int, chunked: bool, headers: dict[str, str]) -> tuple[int, dict, int]:
    """POST a `total`-byte JSON body generated as it goes (never held whole), with a declared Content-Length or
    chunked, until the server answers: (status, JSON answer, bytes sent before the answer)."""
    import select

    host, port = served["base"].removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    piece = b"x" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{head}"
                           f"{framing}\r\n\r\n".encode() + (b'{"prompt": "' if not chunked else b""))
        sent = 0
        while sent < total and not select.select([connection], [], [], 0)[0]:
            assert sent < GIVE_UP, f"{sent} bytes sent and no answer: the server reads past its limit"
            try:
                connection.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece)
            except OSError:  # the server closed after answering; the answer is in the socket
                break
            sent += len(piece)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += connection.recv(65536)
        head_part, body = answer.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head_part.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += connection.recv(65536)
    return int(head_part.split()[1]), json.loads(body), sent


def test_anonymous_calls_are_refused_on_every_route_but_health(served):
    """Every route of the app (from its own schema, and FastAPI's docs routes), every method, with a body that is
    not even JSON: 401 unless it is a GET of a health endpoint."""
    from factory.routing.api import HEALTH_PATHS, api

    schema = requests.get(f"{served['base']}/openapi.json", headers=key_header("acme"), timeout=10).json()
    routes = {(path, method.upper()) for path, methods in schema["paths"].items() for method in methods}
    routes |= {(path, "GET") for path in (api.openapi_url, api.docs_url, api.redoc_url,
                                          api.swagger_ui_oauth2_redirect_url)}
    assert {("/v1/generate", "POST"), ("/healthz", "GET"), ("/openapi.json", "GET")} <= routes
    for path, method in sorted(routes):
        for headers in ({}, {"Authorization": "Bearer fk_000000000000_" + "0" * 64}):
            response = requests.request(method, f"{served['base']}{path}", data=b"{not json", timeout=30,
                                        headers={"Content-Type": "application/json", **headers})
            expected = 200 if method == "GET" and path in HEALTH_PATHS else 401
            assert response.status_code == expected, (method, path, response.text)
    # a path no route has, and a health path with another method, are no way around it
    assert_error(requests.get(f"{served['base']}/v1/nothing-here", timeout=10), 401)
    assert_error(requests.post(f"{served['base']}/healthz", json={}, timeout=10), 401)


def test_the_key_is_checked_before_the_body_is_parsed(served):
    for body in (b"{not json", json.dumps({"prompt": "x", "colour": "red"}).encode(),
                 json.dumps({"prompt": "x" * (MAX_IMAGE_BYTES * 4)}).encode()):  # bad, wrong shape, over the limit
        response = requests.post(f"{served['base']}/v1/generate", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert assert_error(response, 401)["code"] == "unauthenticated"
    # with a key, the same bodies reach the parser and the limit
    keyed = {"Content-Type": "application/json", **key_header("acme")}
    assert_error(requests.post(f"{served['base']}/v1/generate", data=b"{not json", headers=keyed, timeout=30),
                 400, "body")
    big = json.dumps({"prompt": "x" * (MAX_IMAGE_BYTES * 4)}).encode()
    assert_error(requests.post(f"{served['base']}/v1/generate", data=big, headers=keyed, timeout=30), 413, "body")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_1gib_body_is_refused_before_it_is_read_whole(served, ray_cluster, chunked):
    """1 GiB from a generator, with a key: 413 while the body is still arriving, with Serve's proxy and the ingress
    replica each within RSS_BOUND of where they started, and the rest of the body left unread in the client's
    socket; without a key, 401 just as early."""
    limit = served["serving"].config.api.limits.max_body_bytes
    pids = _serve_pids(ray_cluster["dashboard"])
    for tenant, status in (("acme", 413), (None, 401)):
        headers = key_header(tenant) if tenant else {}
        with PeakGrowth(pids) as memory:
            code, body, sent = stream_body(served, "/v1/caption", total=GIB, chunked=chunked, headers=headers)
        assert (code, body["status"]) == (status, status), body
        if status == 413:
            assert body["field"] == "body" and str(limit) in body["message"]
        print(f"{'chunked' if chunked else 'declared'} {status}: sent {sent >> 20} MiB before the answer, "
              f"growth {({name: value >> 20 for name, value in memory.growth().items()})} MiB")
        # what the server took in is at most the limit and what the two sockets' buffers hold, under any load
        assert sent <= limit + socket_buffers() + (1 << 20), sent
        assert all(growth < RSS_BOUND for growth in memory.growth().values()), memory.growth()
    import psutil

    # the proxy process runs with what installs the bound (Serve reads it from its env as it starts)
    assert psutil.Process(pids["proxy"]).environ().items() >= proxy_environment(limit).items()


def socket_buffers() -> int:
    """The most a loopback TCP connection's buffers hold in flight: the sender's and the receiver's maxima."""
    maxima = [int(Path(f"/proc/sys/net/ipv4/tcp_{side}").read_text().split()[2]) for side in ("wmem", "rmem")]
    return sum(maxima)


def test_grpc_needs_a_key_on_every_method_and_bounds_messages(served, ray_cluster):
    """Every method of factory.v1.Factory (from the proto, so a new one is covered) refuses a call without a
    valid key; a message over the bound is refused by the proxy's gRPC server itself; no reflection."""
    import grpc
    import psutil
    from google.protobuf import message_factory
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    from factory.routing.proto import factory_api_pb2 as pb
    from factory.routing.proto import factory_api_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["Factory"]
    app = ("application", APP)
    with grpc.insecure_channel(served["grpc"]) as channel:
        for method in service.methods:
            request_type = message_factory.GetMessageClass(method.input_type)
            call = channel.unary_unary(f"/{service.full_name}/{method.name}",
                                       request_serializer=request_type.SerializeToString,
                                       response_deserializer=message_factory.GetMessageClass(method.output_type).FromString)
            for metadata in ((app,), (app, ("authorization", "Bearer fk_000000000000_" + "0" * 64))):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request_type(), metadata=metadata, timeout=30)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name
                assert json.loads(caught.value.details())["code"] == "unauthenticated"

        bound = served["serving"].config.api.grpc_max_message_bytes()
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.FactoryStub(channel).Caption(pb.TaskRequest(image=b"\0" * (bound + 1)), metadata=(app,), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not UNAUTHENTICATED: never reached the ingress
        assert "larger than max" in caught.value.details()

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # What stays open on Serve's gRPC proxy in Ray 2.60 (no setting turns them off): its health and app list
        serve_api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        serve_api.Healthz(serve_pb2.HealthzRequest(), timeout=30)
        assert APP in serve_api.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=30).application_names
    # Why api.grpc.all_interfaces must be said: the proxy listens on [::] although api.http.host is loopback
    port = int(served["grpc"].rsplit(":", 1)[1])
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(_serve_pids(ray_cluster["dashboard"])["proxy"]).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert ("::", port) in listening, listening


# ---- same images as in-process calls, from several tenants at once --------------------------------------------


def test_concurrent_tenants_get_the_same_images_as_in_process_calls(served, stack):
    from factory.io.storage import Storage
    from factory.model.lora import LoraPool
    from factory.routing.batch import BatchRunner, ReplicaCall, adapter_key
    from factory.routing.parser import parse_request, with_adapter
    from factory.safety.policy import SafetyChecker

    serving = served["serving"]
    cases = [(tenant, {"prompt": f"{tenant} poster {i}", "seed": 100 + i, "id": f"{tenant}-{i}",
                       **({"region": "eu"} if i == 1 else {})})
             for tenant in ("acme", "globex", "initech", "umbrella") for i in range(3)]
    # initech allows one request in flight: its three go one after another, the others all at once
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(_sequential, served, [c for c in cases if c[0] == "initech"])]
        futures += [pool.submit(lambda c: [post_honouring_retry_after(served, "/v1/generate", c[1], c[0])], case)
                    for case in cases if case[0] != "initech"]
        responses = [r for future in futures for r in future.result()]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    by_id = {r.json()["id"]: r.json() for r in responses}

    runner = BatchRunner(stack, SafetyChecker(serving.config.safety),
                         LoraPool(stack.generator.pipe, max_adapters=4, storage=Storage()),
                         {ref.key: ref for ref in serving.registry.adapters()})
    for tenant, body in cases:
        request = with_adapter(parse_request({**body, "tenant": tenant}, serving.defaults()), serving.registry)
        local = runner.run([ReplicaCall(request=request)], adapter_key(request))[0]
        served_body = by_id[body["id"]]
        assert served_body.get("adapter") == local.adapter and served_body["seed"] == local.seed
        theirs = np.asarray(decoded(served_body)).astype(int)
        ours = np.asarray(Image.open(io.BytesIO(local.image_png))).astype(int)
        # Bit-identical at the same batch size; fp32 kernels of another batch size may round by one level.
        assert np.abs(theirs - ours).max() <= 1, body["id"]


def _sequential(served, cases):
    return [post_honouring_retry_after(served, "/v1/generate", body, tenant) for tenant, body in cases]


# ---- one warm fleet for both doors -----------------------------------------------------------------------------


def test_a_batch_job_naming_the_app_joins_the_same_replicas(served, tmp_path):
    from factory.jobs.cluster.serve_app import deploy
    from factory.jobs.spec import JobSpec
    from factory.routing.tenants import TenantRegistry

    config = served["serving"].config
    spec = JobSpec.model_validate({
        "name": "joins", "inputs": [str(tmp_path / "m.jsonl")], "output": str(tmp_path / "out"),
        "profile": "tiny", "tenants": str(TENANTS), "safety": config.safety.model_dump(),
        "serve": {"app_name": APP, "replicas": 1, "num_cpus": 1, "max_batch_size": 4, "batch_wait_timeout_s": 0.01,
                  "max_ongoing_requests": 4},
    })
    replica_ids = _replica_actor_names()
    deploy(spec, APP, TenantRegistry.from_file(TENANTS), owned=False)  # reused: same fingerprint
    assert _replica_actor_names() == replica_ids
    other = spec.model_copy(update={"serve": spec.serve.model_copy(update={"max_batch_size": 2})})
    from factory.errors import ConfigError

    with pytest.raises(ConfigError, match="serving another config"):
        deploy(other, APP, TenantRegistry.from_file(TENANTS), owned=False)


def _replica_actor_names() -> set[str]:
    import ray

    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if f"{APP}#StackReplica" in actor["name"]}


# ---- fuzzing the schema ---------------------------------------------------------------------------------------


def test_openapi_fuzz_never_answers_5xx_other_than_503_nor_a_traceback(served):
    """Bodies, headers and queries generated from /openapi.json, valid ones and invalid ones, with a valid key."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies
    from schemathesis import GenerationMode

    headers = key_header("globex")
    schema = schemathesis.openapi.from_url(f"{served['base']}/openapi.json", headers=headers)
    failures, calls = [], []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/tasks", "/v1/generate", "/v1/caption", "/v1/answer"}
    for operation in operations:
        strategy = strategies.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                                     operation.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case):
            response = case.call(base_url=served["base"], headers=headers, timeout=60)
            calls.append(response.status_code)
            if (response.status_code >= 500 and response.status_code != 503) or "Traceback" in response.text:
                failures.append((operation.label, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:5]
    assert 200 in calls and any(400 <= status < 500 for status in calls)  # it reached the models and the checks


# ---- a replica killed mid-request ------------------------------------------------------------------------------


def test_a_killed_replica_fails_its_requests_quickly_and_serve_replaces_it(served):
    """Requests the replica had accepted (one batch of 4: max_ongoing_requests) get a 503 at once when it dies;
    requests still queued in Serve's router go to the replacement. Later requests succeed."""
    import ray

    for attempt in range(3):  # the kill must land while the batch runs (~0.5 s); rarely it lands before
        (name,) = _replica_actor_names()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(_timed_post, served, {"prompt": f"in flight {i}", **SLOW}) for i in range(4)]
            time.sleep(0.2)
            ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            answers = [future.result() for future in futures]
        wait_for(lambda: _replica_actor_names() - {name}, 90)
        statuses = [response.status_code for response, _ in answers]
        assert set(statuses) <= {200, 503}, statuses
        if 503 in statuses:
            break
    else:
        pytest.fail("the kill never landed while requests were in flight")
    for response, seconds in answers:
        if response.status_code == 503:
            assert assert_error(response, 503)["code"] == "replica_unavailable"
            assert response.headers["Retry-After"] == "1"
            assert seconds < 10  # a clear answer at once, not a wait for the request timeout (60 s here)
    later = post(served, "/v1/generate", {"prompt": "after", "seed": 1}, timeout=120)
    assert later.status_code == 200, later.text


def _timed_post(served, body):
    started = time.monotonic()
    response = post(served, "/v1/generate", body, tenant="umbrella", timeout=120)
    return response, time.monotonic() - started
