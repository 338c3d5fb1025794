"""python -m services.datagen: serve the datagen service until SIGTERM."""

from services.core.runtime import run_service
from services.datagen.service import DatagenSettings
from services.datagen.servicer import build

if __name__ == "__main__":
    run_service(DatagenSettings(), build)
