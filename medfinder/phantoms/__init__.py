"""Synthetic chest CT cases with matching reports: the demo corpus and the ground truth of retrieval.

Real paired CT and report data cannot be fetched or redistributed here, so every test of retrieval
and the demo app run on cases whose content we know exactly. ``generate_case(seed, index)`` builds
one case deterministically: a patient (sex, age, body habitus), a set of findings drawn with
realistic co-occurrence, a HU volume in which those findings are painted where their geometry
says, a radiology report that states them (and negates others, in varied wording), and the
labels.

How a volume is made. Anatomy lives in a patient frame in millimetres (x to the patient's right,
y anterior, z superior, z = 0 at the right hemidiaphragm dome). Each structure is a shape with an
approximate signed distance (ellipses, capsules, boxes, implicit regions); painting blends the
shape's HU into the volume with a soft edge one voxel wide, which is the partial-volume effect a
scanner produces, and writes a tissue code where the shape covers more than half a voxel. Later
shapes cover earlier ones, with optional lists of tissues they may replace (lung vessels only in
lung, a node only in fat). The volume is painted in slabs of slices so that a 512x512x300 scan
needs little memory; a Gaussian point-spread function and correlated noise (seeded per slice, so
the slab size never changes the result) finish it.

The package, each module importing only those above it in this list: ``records`` (label space,
tissue codes, ``PhantomFinding``/``PhantomCase``), ``addresses`` (case ids, ``phantom:SEED:INDEX``),
``geometry`` (shapes), ``trees`` (vessel and airway trees), ``plan`` (which findings),
``report_writer``, ``anatomy``, ``grid`` (voxels and the canvas), ``scene`` (paint operations),
``body`` (the normal anatomy), ``findings``, ``render``, ``case`` (``generate_case``), ``corpus``
(NIfTI, manifest, ``findings.jsonl``), ``examples`` (README renders). The command line is ``medfinder.cli.phantoms``.
"""

from .addresses import PHANTOM_SCHEME, is_phantom_path, phantom_case_id, phantom_path
from .case import case_plan, generate_case
from .corpus import (
    FINDINGS_FILE,
    findings_record,
    load_scan,
    manifest_columns,
    phantom_volume,
    write_corpus,
    write_findings,
    write_manifest,
)
from .examples import render_examples
from .records import (
    DEMO_SHAPE,
    DEMO_SPACING,
    LOBES,
    MANIFEST_HEAD,
    MANIFEST_TAIL,
    PHANTOM_FINDINGS,
    TISSUE_CODES,
    PhantomCase,
    PhantomError,
    PhantomFinding,
)
from .report_writer import NEGATIONS, write_report

__all__ = [
    "DEMO_SHAPE", "DEMO_SPACING", "FINDINGS_FILE", "LOBES", "MANIFEST_HEAD", "MANIFEST_TAIL", "NEGATIONS",
    "PHANTOM_FINDINGS", "PHANTOM_SCHEME", "TISSUE_CODES",
    "PhantomCase", "PhantomError", "PhantomFinding",
    "case_plan", "findings_record", "generate_case", "is_phantom_path", "load_scan", "manifest_columns", "phantom_case_id",
    "phantom_path", "phantom_volume", "render_examples", "write_corpus", "write_findings", "write_manifest",
    "write_report",
]
