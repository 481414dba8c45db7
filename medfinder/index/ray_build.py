"""The index build on a Ray cluster: Ray Data prepares and encodes, this process stays the one writer.

``python -m index_build ... --ray [ADDRESS]`` runs ``build_index_with_ray``; without ADDRESS a local
Ray starts (and stops at the end), with ``auto`` or ``ray://host:10001`` the build joins a cluster.
The pipeline, one Ray Data dataset::

    from_items(records)                        the listing (the cases not yet in the index)
      .map(prepare_case)                       CPU tasks: load, preprocess, thumbnail, parse the report
      .map_batches(_CaseEncoder, ActorPool)    one model per actor, on a GPU with ``gpus_per_actor``
      .iter_batches()                          streamed back here, to the index's single CaseWriter

Why it stays correct:

- **One writer.** Workers never open the index folder; they return entries, and this process adds
  them with ``CaseWriter``, committing at least every ``commit_every_s`` seconds with the same atomic
  commits as the plain build. A case id already written in this run is not written again.
- **Faults.** Ray Data retries a map task whose worker process dies (``max_retries=-1`` for system
  failures, its default) and restarts a dead encoder actor and re-runs its batch
  (``max_restarts=-1``, ``max_task_retries=-1``, its defaults for actor pools): a ``kill -9`` of a
  worker loses and duplicates nothing (tested). A crashed or interrupted build resumes like the plain
  one: its committed cases are skipped.
- **Same result as the plain path.** The same ``prepare_case`` and ``encode_cases`` run on the same
  model; BatchNorm runs in eval mode, so a case's vectors do not depend on the batch it was in.

The model is loaded here (its fingerprint and channels open the index) and handed to the actors
through Ray's object store, so the weights need not be installed on the other machines; the
``medfinder`` package and the ``load`` callable's own dependencies must be. ``load`` (a
``ScanLoader``) travels to the workers with cloudpickle: a PACS loader must be picklable and find
its credentials on the workers (environment variables).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import MedFinderError
from ..io.manifests import ManifestCase
from .build import BuildSummary, CaseWriter, ScanLoader, encode_cases, load_scan, open_or_create, prepare_case

log = logging.getLogger(__name__)

#: ``--ray`` given without an address: start a local Ray for this build.
LOCAL = "local"
#: Memory a prepare task reserves: a large CT (512x512x600 int16 is 300 MB) while it is resampled.
PREPARE_MEMORY = 1 << 30


def build_index_with_ray(
    records: Sequence[ManifestCase],
    out: str | Path,
    model: str | Path,
    address: str | None = None,
    *,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
    prepare_memory: int = PREPARE_MEMORY,
    num_cpus: int | None = None,
    batch_size: int = 8,
    settings: dict | None = None,
    commit_every_s: float = 30.0,
    progress: bool = True,
    device: str = "auto",
    load: ScanLoader = load_scan,
) -> BuildSummary:
    """Add every record not yet in the index at ``out``, preparing and encoding on Ray.

    Args:
        records: the cases (a manifest, a DICOM tree, a dataset layout, a PACS listing).
        out: the index folder (created when absent, extended otherwise).
        model: a model folder or a built-in model name.
        address: ``None`` or ``"local"`` for a local Ray (``num_cpus`` CPUs), ``"auto"`` or
            ``ray://host:10001`` for a cluster. A Ray already initialised in this process is used as it is.
        actors: encoder actors, each holding one copy of the model.
        gpus_per_actor: GPUs each actor asks Ray for (0: encode on CPUs).
        cpus_per_actor: CPUs each actor asks Ray for (its PyTorch threads).
        prepare_memory: bytes of memory each prepare task reserves (Ray schedules no more of them on a
            node than its memory holds); it also keeps Ray Data from fusing the preparation into the
            encoder actors, which would leave their GPUs idle while a CT is read and resampled.
        num_cpus: the CPUs of a local Ray (default: all of this machine's).
        batch_size: cases per encoder call.
        device: where an actor encodes: ``auto`` (its GPU if Ray gave it one), ``cpu`` or ``cuda``.
        load: how a worker fetches a case's scan (see ``medfinder.index.build.ScanLoader``).
    """
    try:
        import ray
    except ImportError:
        raise MedFinderError("Building on Ray needs the ray package: pip install 'medfinder[scale]'.") from None

    from ..model import load_model

    if actors < 1 or gpus_per_actor < 0 or cpus_per_actor <= 0 or batch_size < 1:
        raise MedFinderError("A Ray build needs at least one actor, a batch size of at least 1, and no negative GPUs or CPUs.")
    if device == "cuda" and gpus_per_actor <= 0:
        raise MedFinderError("--device cuda on Ray needs GPUs for the encoder actors: give --ray-gpus-per-actor.")
    started = time.perf_counter()
    out = Path(out)
    model_name = model
    loaded = load_model(model_name)  # on this CPU: its fingerprint and channels open the index
    # Ray first: a cluster that cannot be joined leaves no new index folder behind.
    ours = _init_ray(address, num_cpus) if records else False
    try:
        index = open_or_create(out, loaded, model_name, settings)
    except BaseException:
        if ours:
            ray.shutdown()
        raise
    summary = BuildSummary()
    try:
        done = index.case_ids()
        todo = [r for r in records if r.case_id not in done]
        summary.skipped_done = len(records) - len(todo)
        writer = CaseWriter(index, summary, commit_every_s, started)
        if todo:
            dataset = _pipeline(todo, loaded, load, actors=actors, gpus_per_actor=gpus_per_actor,
                                cpus_per_actor=cpus_per_actor, prepare_memory=prepare_memory,
                                batch_size=batch_size, device=device, progress=progress)
            _consume(dataset, todo, writer, summary, progress)
        writer.commit()
    finally:
        index.close()
        if ours:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    return summary


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to Ray; returns whether this call started it (and so must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray's own warning repeats the error below
            if address in (None, LOCAL):
                ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as error:
        where = "a local Ray" if address in (None, LOCAL) else f"the Ray cluster at {address}"
        raise MedFinderError(f"Cannot start or join {where} ({str(error).strip().splitlines()[0]}).") from None
    return True


def _pipeline(todo: list[ManifestCase], model: Any, load: ScanLoader, *, actors: int, gpus_per_actor: float,
              cpus_per_actor: float, prepare_memory: int, batch_size: int, device: str, progress: bool) -> Any:
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar, this process's (per case written)
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Cases, prepared items and entries are Python objects (reports, parsed findings, PNG bytes):
    # Ray Data keeps them as pickled objects in its Arrow blocks, on purpose (no warning needed).
    context.enable_fallback_to_arrow_object_ext_type = True
    preprocessor = model.make_preprocessor()
    model_ref = ray.put(model)
    dataset = ray.data.from_items([{"record": record} for record in todo])
    dataset = dataset.map(_prepare_row, fn_kwargs={"preprocessor": preprocessor, "load": load}, num_cpus=1,
                          memory=prepare_memory)
    return dataset.map_batches(
        _CaseEncoder,
        fn_constructor_kwargs={"model": [model_ref], "device": device},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )


def _prepare_row(row: dict[str, Any], preprocessor: Any, load: ScanLoader) -> dict[str, Any]:
    """``prepare_case`` as a Ray Data map task (runs in any worker process)."""
    return {"item": prepare_case(row["record"], preprocessor, load)}


class _CaseEncoder:
    """An encoder actor: one model on its device, turning prepared cases into index entries.

    Args:
        model: a one-element list holding the ObjectRef of the model (a list, so Ray hands the
            reference over rather than the model itself, which is fetched here, once).
        device: ``auto``, ``cpu`` or ``cuda``, resolved in the actor (where its GPU is).
    """

    def __init__(self, model: list[Any], device: str) -> None:
        import ray

        from ..devices import resolve_device

        self.model = ray.get(model[0]).to(resolve_device(device))
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = list(batch["item"])
        usable = [item for item in items if not item["error"]]
        entries = iter(encode_cases(self.model, usable) if usable else [])
        out_entries, case_ids, errors = [], [], []
        for item in items:
            case_ids.append(item["record"].case_id)
            errors.append(item["error"] or "")
            out_entries.append(None if item["error"] else next(entries))
        return {"case_id": np.array(case_ids, dtype=object), "error": np.array(errors, dtype=object),
                "entry": np.array(out_entries, dtype=object)}


def _consume(dataset: Any, todo: list[ManifestCase], writer: CaseWriter, summary: BuildSummary, progress: bool) -> None:
    """Stream the encoded cases into the single writer, each case once."""
    from tqdm.auto import tqdm

    seen: set[str] = set()
    bar = tqdm(total=len(todo), desc="indexing (ray)", unit=" cases", disable=not progress)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        entries = []
        for case_id, error, entry in zip(batch["case_id"], batch["error"], batch["entry"]):
            if case_id in seen:  # a retried batch that had already come back: written once only
                continue
            seen.add(case_id)
            if error:
                writer.fail(case_id, error)
            else:
                entries.append(entry)
        writer.add(entries)
        bar.update(len(batch["case_id"]))
        bar.set_postfix(failed=len(summary.failed))
    bar.close()
    for record in todo:
        if record.case_id not in seen:  # never expected: Ray Data retries until every case is back
            writer.fail(record.case_id, "the Ray pipeline did not return this case")
