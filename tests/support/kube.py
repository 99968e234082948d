"""A Kubernetes API for the operator's tests: kmock's emulator, with what kopf needs that kmock 0.8 lacks.

kmock (from kopf's author) keeps objects in memory and serves discovery, list, watch, create,
patch and delete. kopf relies on a few more things a real API server does; :class:`KubeEmulator`
adds them, each one small and named:

- **object metadata**: ``uid``, ``creationTimestamp``, ``generation`` (bumped when ``spec``
  changes) and a rising ``resourceVersion`` on every write, the same in the response and in the
  watch event (kopf waits for the version it wrote before handling the object again);
- **JSON-patch ``test`` ops answer 422** when they fail (kopf guards its finalizer patches with a
  test on ``resourceVersion`` and retries on 422; kmock answered 500);
- **the status subresource**: a patch to ``…/status`` changes only ``status``, a patch or create
  of the object ignores ``status`` (the operator must write status through the subresource);
- **``generateName``** (kopf's Events are created with it), and ``201 Created`` for creations;
- **lists say ``kind: …List``** and carry a ``resourceVersion``; core discovery says
  ``groupVersion: v1`` (kmock said ``/v1``);
- **``/api/v1/namespaces``** (kmock parses ``namespaces`` there as a namespace prefix): served
  here from a fixed set, for operators restricted to a list of namespaces;
- **watches start where the list ended**: a watch with ``resourceVersion=N`` replays only objects
  changed after N (kmock replayed everything, so kopf handled every object twice), and no write is
  lost between that replay and the subscription to new events (both happen under the lock that
  writes hold).

:class:`KubeServer` runs it on its own event loop in a thread and writes a kubeconfig for it, so
the operator (in other threads) and the tests talk to it over HTTP like to any API server.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import json
import random
import re
import string
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml

_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(?:/(?P<name>[^/]+))?")

# The API server's limit on an object's annotations, keys and values together.
MAX_ANNOTATIONS_BYTES = 256 * 1024


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    namespace_names: set[str] = attrs.field(factory=set)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _writes: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    # --- declaring what the server knows -------------------------------------------------------

    def serve_crd(self, crd: Mapping[str, Any]) -> None:
        """Declare a CRD's resource (discovery) and store the CRD object itself."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular"),
                namespaced=spec["scope"] == "Namespaced",
                shortnames=names.get("shortNames", []),
                categories=names.get("categories", []),
                verbs={"get", "list", "watch", "create", "patch", "delete"},
                subresources=set(version.get("subresources") or {}),
            )
        crds = "apiextensions.k8s.io/v1/customresourcedefinitions"
        self.objects[crds, None, crd["metadata"]["name"]] = self._stamped(dict(crd))

    def declare_core(self) -> None:
        verbs = {"get", "list", "watch", "create", "patch", "delete"}
        self.resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs=verbs)
        self.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=verbs)
        self.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
            kind="CustomResourceDefinition", namespaced=False, verbs=verbs
        )

    def put(self, resource: str, obj: Mapping[str, Any]) -> None:
        """Store an object before anything watches (peering objects, fixtures)."""
        meta = obj["metadata"]
        self.objects[resource, meta.get("namespace"), meta["name"]] = self._stamped(dict(obj))

    # --- metadata a real API server maintains --------------------------------------------------

    def _next_version(self) -> str:
        return str(next(self._versions))

    def _stamped(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["generation"] = 1
        meta["resourceVersion"] = self._next_version()
        return obj

    def _info(self, request: kmock.Request) -> kmock.ResourceInfo | None:
        res = request.resource
        return self.resources[res] if res is not None and res in self.resources else None

    def _has_status(self, request: kmock.Request) -> bool:
        info = self._info(request)
        return info is not None and "status" in info.subresources

    @staticmethod
    def _with_data(request: kmock.Request, data: Any) -> kmock.Request:
        # kmock matches reactions against the requests it recorded, by identity: the request must
        # stay the same object, so its (frozen) body is replaced in place.
        object.__setattr__(request, "data", data)
        return request

    def _prepare_create(self, request: kmock.Request) -> kmock.Request:
        data = copy.deepcopy(request.data) if isinstance(request.data, Mapping) else {}
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if request.namespace:
            meta["namespace"] = request.namespace
        if self._has_status(request):
            data.pop("status", None)
        info = self._info(request)
        if info is not None and info.kind and request.resource is not None:
            group, version = request.resource.group, request.resource.version
            data.setdefault("apiVersion", f"{group}/{version}" if group else version)
            data.setdefault("kind", info.kind)
        return self._with_data(request, self._stamped(data))

    def _prepare_patch(self, request: kmock.Request) -> kmock.Request:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return request  # kmock answers 404
        current = copy.deepcopy(self.objects[key].raw)
        subresource = request.subresource
        status_split = self._has_status(request)

        def allowed(path: str) -> bool:
            in_status = path == "/status" or path.startswith("/status/")
            return not status_split or (in_status if subresource == "status" else not in_status)

        data: Any = request.data
        if isinstance(data, list):  # JSON patch
            try:
                jsonpatch.apply_patch(current, data)  # fails on a failed ``test`` op
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc
            ops = [op for op in data if op.get("op") != "test" and allowed(op.get("path", ""))]
            after = jsonpatch.apply_patch(current, ops)
        elif isinstance(data, Mapping):  # merge patch
            data = {k: v for k, v in data.items() if allowed(f"/{k}") or (k == "metadata" and subresource != "status")}
            after = _merge(current, data)
        else:
            raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType", message="unsupported patch")
        annotations = after.get("metadata", {}).get("annotations") or {}
        size = sum(len(k) + len(v) for k, v in annotations.items() if isinstance(v, str))
        if size > MAX_ANNOTATIONS_BYTES:  # as the API server refuses it
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message=f"metadata.annotations: Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes",
            )
        generation = current["metadata"].get("generation", 1) + (after.get("spec") != current.get("spec"))
        stamp = {"resourceVersion": self._next_version(), "generation": generation}
        if isinstance(data, list):
            data = ops + [{"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in stamp.items()]
        else:
            data = {**data, "metadata": {**(data.get("metadata") or {}), **stamp}}
        return self._with_data(request, data)

    def _prepare_delete(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        if key in self.objects and not self.objects[key].deleted:
            meta = self.objects[key].get("metadata", {})
            if meta.get("finalizers") and not meta.get("deletionTimestamp"):
                # kmock then sets deletionTimestamp and emits MODIFIED: with a new version.
                self.objects[key].patch({"metadata": {"resourceVersion": self._next_version()}})

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in (
            kmock.action.CREATE,
            kmock.action.UPDATE,
            kmock.action.DELETE,
        ):
            return await super()._handle(request)
        async with self._writes:  # one write at a time: versions rise in the order of events
            if request.action == kmock.action.CREATE:
                request = self._prepare_create(request)
            elif request.action == kmock.action.UPDATE:
                request = self._prepare_patch(request)
            else:
                self._prepare_delete(request)
            return await super()._handle(request)

    # --- reading ---------------------------------------------------------------------------------

    def _matches(self, request: kmock.Request, key: tuple[Any, str | None, str]) -> bool:
        resource, namespace, name = key
        return bool(
            resource == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    async def _serve_create(self, request: kmock.Request) -> Any:
        return kmock.Response(status=201, payload=await super()._serve_create(request))

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = dict(await super()._serve_list(request))
        info = self._info(request)
        if info is not None and info.kind:
            result["kind"] = f"{info.kind}List"
        res = request.resource
        if res is not None:
            result["apiVersion"] = f"{res.group}/{res.version}" if res.group else res.version
        result["metadata"] = {"resourceVersion": self._next_version()}
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""
        assert request.resource is not None
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion", "")
        since_version = int(since) if since.isdigit() else 0
        async with self._lock:  # kmock writes and publishes under this lock: nothing slips between
            events = [
                {"type": "ADDED", "object": obj.raw}
                for key, obj in self.objects.items()
                if self._matches(request, key)
                and not obj.deleted
                and int(obj.get("metadata", {}).get("resourceVersion", "0")) > since_version
            ]
            marker = await bus.mark()
        try:
            for event in events:
                yield event
            async for event in bus.stream(since=marker):
                meta = event.get("object", {}).get("metadata", {})
                if self._matches(request, (request.resource, meta.get("namespace"), meta.get("name"))):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = dict(await super()._serve_version(request))
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        return result

    # --- namespaces ------------------------------------------------------------------------------

    def _namespace(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "resourceVersion": "1"},
            "status": {"phase": "Active"},
        }

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACES_PATH.fullmatch(raw_request.path)
        if match is None or raw_request.method != "GET":
            return await super().__call__(raw_request)
        name = match["name"]
        if name is not None:
            if name not in self.namespace_names:
                return aiohttp.web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
            return aiohttp.web.json_response(self._namespace(name))
        items = [self._namespace(n) for n in sorted(self.namespace_names)]
        if raw_request.query.get("watch") != "true":
            body = {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"}, "items": items}
            return aiohttp.web.json_response(body)
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        await self._closing.wait()  # a fixed set: nothing more to tell until the server stops
        return response

    def close_streams(self) -> None:
        self._closing.set()


class KubeServer:
    """The emulator on its own event loop in a thread, with a kubeconfig pointing at it."""

    def __init__(self, directory: Path, crds: Iterable[Mapping[str, Any]], namespaces: Iterable[str]) -> None:
        self.kubeconfig = directory / "kubeconfig.yaml"
        self.emulator = KubeEmulator(namespace_names=set(namespaces))
        self.emulator.declare_core()
        for crd in crds:
            self.emulator.serve_crd(crd)
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kube-api", daemon=True)
        self._error: BaseException | None = None

    def put(self, resource: str, obj: Mapping[str, Any]) -> None:
        self.emulator.put(resource, obj)

    def start(self) -> KubeServer:
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError(f"the Kubernetes API emulator did not start: {self._error!r}")
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
                    "users": [{"name": "tests", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tests"}}],
                    "current-context": "kmock",
                }
            )
        )
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emulator, kmock.Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            self.emulator.close_streams()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
