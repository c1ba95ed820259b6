"""An app's workload with Microsoft's Python SDK (powerplatform-dataverse-client).

Run by tests/python_sdk.rs once through the gateway and once straight against the
stand-in Dataverse; prints one JSON line of what the app saw, with record ids replaced
by their order of creation so the two runs compare equal.

Environment: DATAVERSE_URL (https base URL), BEARER_TOKEN (what the credential returns),
REQUESTS_CA_BUNDLE (the test CA). Every URL the SDK calls after the first comes from a
server answer (OData-EntityId, @odata.nextLink): if one named another origin the run
fails, which is the point.
"""

import hashlib
import json
import os
import sys
import tempfile
import time
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse.client import DataverseClient
import requests


class CallerToken:
    """A TokenCredential that hands the SDK the token it was given."""

    def __init__(self, token):
        self._token = token

    def get_token(self, *scopes, **kwargs):
        return AccessToken(self._token, int(time.time()) + 3600)


def main():
    base = os.environ["DATAVERSE_URL"]
    origin = urlsplit(base).netloc
    seen = {"origins": set(), "encodings": set(), "accept_encodings": set()}

    # Watch every response the SDK gets: which origin it called, how the body came.
    original_send = requests.Session.send

    def send(session, request, **kwargs):
        seen["origins"].add(urlsplit(request.url).netloc)
        seen["accept_encodings"].add(request.headers.get("Accept-Encoding", ""))
        response = original_send(session, request, **kwargs)
        seen["encodings"].add(response.headers.get("Content-Encoding", "identity"))
        return response

    requests.Session.send = send

    ids = {}

    def name_of(record_id):
        return ids.setdefault(record_id, f"record-{len(ids) + 1}")

    out = {}
    with DataverseClient(base, CallerToken(os.environ["BEARER_TOKEN"])) as client:
        created = client.records.create("account", {"name": "Python Contoso"})
        out["created"] = name_of(created)
        got = client.records.retrieve("account", created, select=["name"])
        out["retrieved"] = got["name"]
        client.records.update("account", created, {"name": "Python Contoso Renamed"})
        out["updated"] = client.records.retrieve("account", created, select=["name"])["name"]

        many = client.records.create(
            "account", [{"name": f"Python Bulk {i}"} for i in range(3)]
        )
        out["bulk_created"] = [name_of(i) for i in many]

        pages = []
        for page in client.records.list_pages("account", select=["name"], page_size=2):
            pages.append(sorted(r["name"] for r in page))
        out["pages"] = pages

        batch = client.batch.new()
        batch.records.create("account", {"name": "Python Batch One"})
        batch.records.update("account", created, {"name": "Python Contoso Batched"})
        with batch.changeset() as changeset:
            changeset.records.create("contact", {"firstname": "Ada", "lastname": "Py"})
        result = batch.execute()
        batch_account, batch_update, batch_contact = result.responses
        out["batch"] = {
            "statuses": [r.status_code for r in result.responses],
            "errors": result.has_errors,
            "created": [name_of(batch_account.entity_id), name_of(batch_contact.entity_id)],
            "updated": name_of(batch_update.entity_id),
        }
        out["after_batch"] = client.records.retrieve("account", created, select=["name"])["name"]

        # Files: a small one in one PATCH, a 9 MiB one in the SDK's chunked mode (its
        # chunks go to the Location the first answer named), each read back as $value.
        files = {}
        with tempfile.TemporaryDirectory() as scratch:
            for mode, size, record_id in [
                ("small", 1000, many[0]),
                ("chunk", 9 * 1024 * 1024 + 17, created),
            ]:
                content = bytes((i * 7 + size) % 251 for i in range(size))
                path = os.path.join(scratch, f"{mode}.bin")
                with open(path, "wb") as fh:
                    fh.write(content)
                client.files.upload("account", record_id, "new_Document", path, mode=mode)
                download = requests.get(
                    f"{base}/api/data/v9.2/accounts({record_id})/new_document/$value",
                    headers={"Authorization": f"Bearer {os.environ['BEARER_TOKEN']}"},
                    timeout=60,
                )
                files[mode] = {
                    "status": download.status_code,
                    "intact": hashlib.sha256(download.content).hexdigest()
                    == hashlib.sha256(content).hexdigest(),
                    "name": download.headers.get("x-ms-file-name"),
                }
        out["files"] = files

        for record_id in [created, *many, batch_account.entity_id]:
            client.records.delete("account", record_id)
        client.records.delete("contact", batch_contact.entity_id)
        remaining = [r["name"] for r in client.records.list("account", select=["name"])]
        out["remaining"] = sorted(remaining)

    out["other_origins"] = sorted(o for o in seen["origins"] if o != origin)
    out["response_encodings"] = sorted(seen["encodings"])
    out["asked_for_gzip"] = all("gzip" in a for a in seen["accept_encodings"])
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
