"""A local Cloud Storage endpoint for tests: `gcp-storage-emulator` in a process of its own.

    with gcs_emulator.serve("moejax-test") as env:   # env: what points clients at it
      subprocess.run([...], env={**os.environ, **env})

Clients find the endpoint through the environment: gcsfs (and so `etils.epath` and TensorBoard's
fsspec file system) reads STORAGE_EMULATOR_HOST; TensorStore (Orbax's array storage) reads
TENSORSTORE_GCS_HTTP_URL; GCE_METADATA_ROOT and GCE_METADATA_HOST point the credential look-ups
at a closed port, so that no client waits for a metadata server.

The emulator is run with three behaviours of Cloud Storage that it lacks and that moejax's
clients rely on:
* a download carries the object's generation in the `x-goog-generation` header (TensorStore
  reads it to version what it caches and to make its conditional writes; without it every
  object reads as generation 0, which TensorStore rejects as malformed);
* an upload with `ifGenerationMatch=G` fails with 412 Precondition Failed unless the object's
  generation is G, where 0 means "the object does not exist" (TensorStore's conditional writes,
  gcsfs's exclusive create `open(path, "xb")`);
* `objects/.../moveTo/o/...` moves an object within its bucket (gcsfs's `mv` tries it first, and
  backs off for half a minute before copying instead when the server lacks it).

Run as a script (`python tests/gcs_emulator.py BUCKET`), it serves on a free port of 127.0.0.1
and prints `port=N` once it accepts requests.
"""

from __future__ import annotations

import contextlib
import http
import http.server
import socket
import subprocess
import sys

METADATA_UNREACHABLE = "127.0.0.1:9"  # the discard port: nothing listens on it


def _generation_of(storage, bucket: str, name: str) -> str:
  """The generation of bucket/name, "0" when there is no such object."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"


def _install_cloud_storage_behaviours() -> None:
  """Adds the generation header and the upload preconditions (module docstring) to the
  emulator's handlers, before its server module copies them into its routing table."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download, insert = objects.download, objects.insert

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status in (http.HTTPStatus.OK, http.HTTPStatus.PARTIAL_CONTENT):
      response["x-goog-generation"] = _generation_of(
          storage, request.params["bucket_name"], request.params["object_id"])

  def insert_if_generation_matches(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    name = (request.query.get("name") or [None])[0]
    if wanted and name is None and isinstance(request.data, dict):
      name = (request.data.get("meta") or request.data).get("name")
    if wanted and name is not None and (
        _generation_of(storage, request.params["bucket_name"], name) != wanted[0]):
      response.status = http.HTTPStatus.PRECONDITION_FAILED
      response.json({"error": {"code": 412, "message": "At least one of the pre-conditions "
                               "you specified did not hold."}})
      return None
    return insert(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation
  objects.insert = insert_if_generation_matches


def _add_move(server) -> None:
  """Routes `POST .../b/BUCKET/o/SOURCE/moveTo/o/DESTINATION` to a copy and a delete."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  def move(request, response, storage, *args, **kwargs):
    bucket, source = request.params["bucket_name"], request.params["object_id"]
    try:
      copy = objects._copy  # pylint: disable=protected-access
      moved = copy(request.base_url, storage, bucket, source, bucket,
                   request.params["dest_object_id"])
      storage.delete_file(bucket, source)
    except NotFound:
      response.status = http.HTTPStatus.NOT_FOUND
      return
    response.json(moved)

  route = (rf"^{server.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/"
           r"(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$")
  server.HANDLERS = ((route, {server.POST: move}), *server.HANDLERS)


def main(argv: list[str]) -> None:
  (bucket,) = argv
  _install_cloud_storage_behaviours()
  # The emulator serves one request at a time; clients such as TensorStore open dozens of
  # connections at once. With the default backlog of 5 the kernel drops the rest of them, and
  # their retries back off for minutes.
  http.server.HTTPServer.request_queue_size = 1024
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  _add_move(server)
  emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
  emulator.start()
  port = emulator._api._httpd.server_address[1]  # pylint: disable=protected-access
  print(f"port={port}", flush=True)
  try:
    sys.stdin.read()  # serves until the parent closes our stdin (or ends)
  finally:
    emulator.stop()


def client_environment(port: int) -> dict[str, str]:
  """The environment variables that point gcsfs and TensorStore at the emulator on `port`."""
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GCE_METADATA_ROOT": METADATA_UNREACHABLE, "GCE_METADATA_HOST": METADATA_UNREACHABLE,
          "GCE_METADATA_IP": METADATA_UNREACHABLE,
          # gcsfs asks the Storage Control API (gRPC, which the emulator lacks) for every
          # bucket's type unless told not to.
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def serve(bucket: str, log=subprocess.DEVNULL):
  """Runs the emulator with `bucket` created; yields the clients' environment (see above).
  `log`: where its request log goes (a file object; default nowhere)."""
  process = subprocess.Popen([sys.executable, __file__, bucket], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=log, text=True)
  try:
    line = process.stdout.readline()
    if not line.startswith("port="):
      raise RuntimeError(f"the GCS emulator did not start (exit status {process.wait()})")
    port = int(line.strip().removeprefix("port="))
    with socket.create_connection(("127.0.0.1", port), timeout=10):
      pass
    yield client_environment(port)
  finally:
    process.stdin.close()
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


if __name__ == "__main__":
  main(sys.argv[1:])
