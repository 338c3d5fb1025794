"""python -m services.merging: serve the merging service until SIGTERM."""

from services.core.runtime import run_service
from services.merging.service import MergingSettings
from services.merging.servicer import build

if __name__ == "__main__":
    run_service(MergingSettings(), build)
