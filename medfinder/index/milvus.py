"""The Milvus backend: a channel's vectors in a Milvus collection, for archives past one machine.

The same code serves an embedded Milvus Lite file (tests, a workstation) and a Milvus standalone or
cluster (``milvus://host:19530``), through ``pymilvus.MilvusClient``. HNSW files stay the default;
this backend is chosen at creation (``--vectors URI``) and the URI is kept in ``index.json``'s
settings, so an index always knows where its vectors live.

How it fits the index's generations and atomic commits
------------------------------------------------------
A collection lives outside the index folder and has no generations, so the folder's commit point
(``index.json``) must decide what is visible. The rule:

1. One collection per index and channel (``<prefix>_<channel>``, the prefix drawn at creation and
   kept in the settings), rows keyed by the case's *label* (int64 primary key).
2. Labels are never reused: ``index.json`` records ``next_label``, every label handed out is at or
   above it, and with this backend a replaced case gets a fresh label (its old one is deleted).
3. Inserts go to Milvus as cases are added (upserts, so a retried batch cannot duplicate rows), but
   a row is only *visible* once its label is below the committed ``next_label``: every search and
   count filters ``label < next_label``. A crash between the Milvus write and ``index.json`` leaves
   rows at or above the committed ``next_label``, which nobody returns, and which the next writer
   deletes when it opens the index (before it hands those labels out again).
4. Deletions are not sent before the commit: the generation's descriptor file (``<channel>.milvus``,
   checksummed like every file) lists the labels this commit deleted, ``index.json`` is replaced,
   and only then are the rows deleted. Until they are gone, every search and count also filters
   ``label not in <that list>``; a writer killed after the commit but before the deletes leaves the
   list for the next writer, which applies it again when it opens the index (deleting is idempotent).

So a reader sees exactly the committed generation's vectors, apart from one thing Milvus cannot
snapshot for us: a deletion committed *after* a reader opened the index also disappears from that
reader's results (its records stay readable). Milvus Lite serves one process at a time (a file
lock): a build and the app cannot use the same Lite file at once; a Milvus server has no such limit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CaseIndexError
from .storage import LITE_FILE
from .vectors import as_ids, checked_batch, empty_result, normalise
#: Where a token for a Milvus server comes from (``user:password`` or an API key); never written down.
TOKEN_ENV = "MEDFINDER_MILVUS_TOKEN"
#: Seconds to wait for a Milvus server before saying it cannot be reached.
CONNECT_TIMEOUT_S = 10.0

_LABEL, _VECTOR = "label", "vector"
# Milvus Lite runs one server per file in this process; how many open indexes use each.
_LITE_USERS: dict[str, int] = {}
_LITE_LOCK = threading.Lock()
_COLLECTION_PREFIX = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
# A label filter spelled out in one expression stays well inside Milvus's expression limits below this.
_MAX_LISTED_LABELS = 100_000



def is_milvus_uri(uri: str) -> bool:
    return uri.split(":", 1)[0] in ("milvus", "milvus-lite", "http", "https")


def normalise_uri(uri: str, folder: Path) -> str:
    """The form of ``uri`` recorded in ``index.json``: ``milvus-lite:<file>`` (relative to the index
    folder when inside it, so the folder can move) or ``milvus://host:port`` / ``https://...``.

    ``milvus-lite`` alone is a file inside the index folder; ``milvus-lite:///abs/path.db`` or
    ``milvus-lite:relative/path.db`` (relative to the current folder) names one.
    """
    uri = uri.strip()
    if uri == "milvus-lite":
        return f"milvus-lite:{LITE_FILE}"
    if uri.startswith("milvus-lite:"):
        rest = uri[len("milvus-lite:"):]
        path = Path(rest[2:]) if rest.startswith("//") else Path(rest)
        if not rest or str(path) in ("", "."):
            raise CaseIndexError(f"The Milvus Lite address {uri!r} names no file; use milvus-lite:///path/vectors.db.")
        if not path.name.endswith(".db"):
            raise CaseIndexError(f"The Milvus Lite file in {uri!r} must have a name ending in .db.")
        path = path.expanduser().absolute()
        try:
            return f"milvus-lite:{path.relative_to(folder.absolute()).as_posix()}"
        except ValueError:
            return f"milvus-lite:{path}"
    match = re.fullmatch(r"(milvus|http|https)://([^/\s:]+)(:\d{1,5})?/?", uri)
    if not match:
        raise CaseIndexError(
            f"The vector address {uri!r} is not a Milvus address: use milvus://host:19530, https://host:port, "
            "milvus-lite (a file in the index folder) or milvus-lite:///path/vectors.db."
        )
    scheme, host, port = match.group(1), match.group(2), match.group(3) or ":19530"
    return f"{'milvus' if scheme in ('milvus', 'http') else 'https'}://{host}{port}"


def client_uri(recorded: str, folder: Path) -> str:
    """What ``MilvusClient`` is given for a recorded address: a local path for Lite, a URL for a server."""
    if recorded.startswith("milvus-lite:"):
        path = Path(recorded[len("milvus-lite:"):])
        return str(path if path.is_absolute() else folder / path)
    return "http://" + recorded[len("milvus://"):] if recorded.startswith("milvus://") else recorded


def connect(recorded: str, folder: Path, timeout: float = CONNECT_TIMEOUT_S) -> Any:
    """A ``MilvusClient`` for the index at ``folder``, or one sentence saying why there is none."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise CaseIndexError(
            f"The case index at {folder} keeps its vectors in Milvus ({recorded}), but pymilvus is not installed "
            "(pip install 'medfinder[scale]')."
        ) from None
    # pymilvus and Milvus Lite log every failed call with its traceback before raising it; the errors
    # they raise become one sentence here, so those logs would only repeat them as noise on a command
    # line. Milvus Lite also runs a gRPC server in this process, which logs an error each time pymilvus
    # asks it for a timestamp it does not serve (while an index is built), and carries on.
    for name in ("pymilvus", "milvus_lite", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    target = client_uri(recorded, folder)
    if recorded.startswith("milvus-lite:"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MilvusClient(target, token=os.environ.get(TOKEN_ENV, ""), timeout=timeout)
    except Exception as error:  # pymilvus raises MilvusException, grpc and OS errors alike
        raise CaseIndexError(_unreachable(recorded, folder, error)) from None
    if recorded.startswith("milvus-lite:"):
        with _LITE_LOCK:
            _LITE_USERS[target] = _LITE_USERS.get(target, 0) + 1
    return client


def disconnect(client: Any, recorded: str, folder: Path) -> None:
    """Close a client from ``connect``. When no index of this process uses a Milvus Lite file any
    more, its in-process server is stopped, which releases the file for other processes."""
    try:
        client.close()
    except Exception:
        pass
    if not recorded.startswith("milvus-lite:"):
        return
    target = client_uri(recorded, folder)
    with _LITE_LOCK:
        users = _LITE_USERS.get(target, 0) - 1
        if users > 0:
            _LITE_USERS[target] = users
            return
        _LITE_USERS.pop(target, None)
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(target)
    except Exception:  # best effort: the file is released at exit anyway
        pass


def _unreachable(recorded: str, folder: Path, error: BaseException) -> str:
    if recorded.startswith("milvus-lite:"):
        target = client_uri(recorded, folder)
        if _locked_elsewhere(Path(target)):
            return (f"The Milvus Lite file {target} of the case index at {folder} is open in another process; "
                    "Milvus Lite serves one process at a time (a Milvus server serves many).")
        return f"The Milvus Lite file {target} of the case index at {folder} cannot be opened ({_reason(error)})."
    return (f"The Milvus server {recorded} holding the vectors of the case index at {folder} cannot be reached "
            f"({_reason(error)}).")


def _locked_elsewhere(data_dir: Path) -> bool:
    """Whether another process holds Milvus Lite's lock (``<data dir>/LOCK``, an flock) on ``data_dir``.
    pymilvus reports that only as "Open local milvus failed"."""
    import fcntl

    try:
        with open(data_dir / "LOCK", "rb") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def _reason(error: BaseException) -> str:
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return str(message).strip().rstrip(".").splitlines()[0]


def collection_prefix() -> str:
    """A fresh prefix for an index's collections: two indexes on one server never share a collection."""
    return f"medfinder_{uuid.uuid4().hex[:16]}"


class MilvusIndex:
    """One channel's vectors in a Milvus collection, cosine similarity, behind ``VectorIndex``.

    Only rows with ``label < visible_below`` and not in ``hidden`` exist for this object (see the
    module's rule); a writer raises ``visible_below`` as it adds, and ``delete`` only hides rows
    until ``apply_deletes`` runs after the commit.

    Args:
        client: a connected ``MilvusClient`` (an index's channels share one).
        collection: the collection's name (``<prefix>_<channel>``).
        dim: the dimension of the channel's vectors.
        visible_below: the committed ``next_label`` of the index.
        hidden: labels the committed generation deleted whose rows may still be in the collection.
        where: the index's Milvus address, for error sentences.
    """

    def __init__(self, client: Any, collection: str, dim: int, visible_below: int = 0,
                 hidden: set[int] | None = None, where: str = "") -> None:
        self.client = client
        self.collection = collection
        self.dim = int(dim)
        self.visible_below = int(visible_below)
        self.hidden: set[int] = set(hidden or ())
        self.where = where or collection
        #: Labels deleted since the last commit: hidden now, removed from Milvus by ``apply_deletes``.
        self.pending: set[int] = set()
        self._count = self._call("count the vectors of", lambda: self._count_visible())

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(cls, client: Any, collection: str, dim: int, where: str = "") -> "MilvusIndex":
        """Make the collection (cosine, AUTOINDEX, strong consistency) and open it."""
        from pymilvus import DataType, MilvusClient

        def make() -> None:
            if client.has_collection(collection):
                raise CaseIndexError(f"The Milvus collection {collection} at {where or 'the server'} already exists.")
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field(_LABEL, DataType.INT64, is_primary=True)
            schema.add_field(_VECTOR, DataType.FLOAT_VECTOR, dim=int(dim))
            params = client.prepare_index_params()
            params.add_index(field_name=_VECTOR, index_type="AUTOINDEX", metric_type="COSINE")
            client.create_collection(collection, schema=schema, index_params=params, consistency_level="Strong")

        _call(where, collection, "create", make)
        return cls(client, collection, dim, 0, set(), where)

    @classmethod
    def open(cls, client: Any, collection: str, dim: int, visible_below: int, hidden: set[int],
             where: str = "") -> "MilvusIndex":
        """Open an existing collection (loading it for search) and check its dimension."""
        def check() -> None:
            if not client.has_collection(collection):
                raise CaseIndexError(
                    f"The Milvus collection {collection} at {where} does not exist: the vectors of this index are gone."
                )
            fields = {f["name"]: f for f in client.describe_collection(collection)["fields"]}
            stored = int((fields.get(_VECTOR, {}).get("params") or {}).get("dim", -1))
            if stored != int(dim):
                raise CaseIndexError(
                    f"The Milvus collection {collection} at {where} holds {stored}-dimensional vectors, not {dim}-dimensional ones."
                )
            client.load_collection(collection)

        _call(where, collection, "open", check)
        return cls(client, collection, dim, visible_below, hidden, where)

    # ------------------------------------------------------------------ the VectorIndex interface
    def __len__(self) -> int:
        return self._count

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = checked_batch(ids, vectors, self.dim)
        if not ids.shape[0]:
            return
        labels = ids.tolist()
        present = self._present(labels)
        rows = [{_LABEL: label, _VECTOR: vector} for label, vector in zip(labels, vectors.tolist())]
        self._call("add vectors to", lambda: self.client.upsert(self.collection, rows))
        self.pending.difference_update(labels)
        self.hidden.difference_update(labels)
        self.visible_below = max(self.visible_below, max(labels) + 1)
        self._count += len(set(labels) - present)

    def delete(self, ids: np.ndarray) -> None:
        labels = [label for label in as_ids(ids).tolist() if label not in self.pending and label not in self.hidden]
        present = self._present(labels)
        self.pending.update(present)
        self._count -= len(present)

    def query(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = normalise(vectors, self.dim, "query vectors")
        k = min(int(k), self._count)
        if k <= 0:
            return empty_result(queries.shape[0])
        hits = self._call("search", lambda: self.client.search(
            self.collection, data=queries.tolist(), limit=k, filter=self._filter(),
            output_fields=[_LABEL], search_params={"metric_type": "COSINE"}, consistency_level="Strong"))
        width = min((len(row) for row in hits), default=0)
        labels = np.array([[hit[_LABEL] if _LABEL in hit else hit["id"] for hit in row[:width]] for row in hits],
                          dtype=np.int64).reshape(len(hits), width)
        scores = np.array([[hit["distance"] for hit in row[:width]] for row in hits], dtype=np.float32).reshape(len(hits), width)
        return labels, scores

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the generation's descriptor: the collection, and the labels this commit deletes."""
        descriptor = {"backend": "milvus", "collection": self.collection, "dim": self.dim,
                      "deleted": sorted(self.hidden | self.pending)}
        Path(path).write_text(json.dumps(descriptor, separators=(",", ":")) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ the commit protocol
    def committed(self) -> None:
        """``index.json`` now names this generation: the deleted labels may really go."""
        self.hidden |= self.pending
        self.pending.clear()
        self.apply_deletes()

    def apply_deletes(self) -> None:
        """Delete the rows the committed generation deleted (idempotent); they stay hidden until done."""
        if self.hidden:
            labels = sorted(self.hidden)
            for start in range(0, len(labels), 10_000):
                chunk = labels[start : start + 10_000]
                self._call("delete vectors from", lambda: self.client.delete(self.collection, ids=chunk))
            self.hidden.clear()

    def purge_uncommitted(self) -> int:
        """Delete rows at or above the committed ``next_label``: what a killed writer left. Returns how many."""
        expression = f"{_LABEL} >= {self.visible_below}"
        stale = self._call("count the vectors of", lambda: self._count_where(expression))
        if stale:
            self._call("delete vectors from", lambda: self.client.delete(self.collection, filter=expression))
        return stale

    def drop_uncommitted(self, committed_next_label: int, committed_hidden: set[int]) -> None:
        """Forget this session's changes (a writer closed without committing)."""
        self.visible_below = int(committed_next_label)
        self.pending.clear()
        self.hidden = set(committed_hidden)
        try:
            self.purge_uncommitted()
        except CaseIndexError:
            pass  # the next writer purges them; until then no reader sees them

    # ------------------------------------------------------------------ helpers
    @classmethod
    def read_descriptor(cls, path: str | os.PathLike[str]) -> dict:
        try:
            descriptor = json.loads(Path(path).read_text(encoding="utf-8"))
            if descriptor.get("backend") != "milvus" or not _COLLECTION_PREFIX.match(descriptor["collection"]):
                raise ValueError("not a Milvus descriptor")
            descriptor["deleted"] = {int(label) for label in descriptor["deleted"]}
            return descriptor
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CaseIndexError(f"The vector descriptor {path} cannot be read ({error}).") from error

    def _filter(self) -> str:
        expression = f"{_LABEL} < {self.visible_below}"
        excluded = self.hidden | self.pending
        if len(excluded) > _MAX_LISTED_LABELS:
            raise CaseIndexError(
                f"The Milvus collection {self.collection} has {len(excluded)} deletions waiting for a commit; "
                "commit before searching."
            )
        if excluded:
            expression += f" and {_LABEL} not in {sorted(excluded)}"
        return expression

    def _count_where(self, expression: str) -> int:
        rows = self.client.query(self.collection, filter=expression, output_fields=["count(*)"],
                                 consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def _count_visible(self) -> int:
        return self._count_where(self._filter())

    def _present(self, labels: list[int]) -> set[int]:
        """Which of ``labels`` are stored and visible (a label at or above ``visible_below`` never is,
        so a writer adding new cases asks Milvus nothing)."""
        labels = [label for label in labels if label < self.visible_below]
        if not labels:
            return set()
        rows = self._call("read", lambda: self.client.query(
            self.collection, filter=f"{self._filter()} and {_LABEL} in {sorted(labels)}", output_fields=[_LABEL],
            consistency_level="Strong"))
        return {int(row[_LABEL]) for row in rows}

    def _call(self, action: str, fn: Any) -> Any:
        return _call(self.where, self.collection, action, fn)


def _call(where: str, collection: str, action: str, fn: Any) -> Any:
    """Run one Milvus request; its failure is one sentence naming the server and the collection."""
    try:
        return fn()
    except CaseIndexError:
        raise
    except Exception as error:  # MilvusException, grpc errors, a server gone mid-request
        raise CaseIndexError(
            f"Cannot {action} the Milvus collection {collection} at {where} ({_reason(error)})."
        ) from None
