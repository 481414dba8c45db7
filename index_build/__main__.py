"""``python -m index_build``: build or extend a MedFinder case index (the ``build`` command).

    python -m index_build --manifest CSV --out DIR [--model M] [--workers N]
    (or --bimcv-r ROOT, --ct-rate ROOT, --dicom-tree ROOT instead of --manifest)
    ... --ray [ADDRESS] [--ray-actors N] [--ray-gpus-per-actor G]   (prepare and encode on Ray)
    ... --vectors milvus://host:19530 | milvus-lite                 (a new index's vectors in Milvus)
"""

import sys

from medfinder.cli import main

if __name__ == "__main__":
    sys.exit(main(command="build", prog="python -m index_build"))
